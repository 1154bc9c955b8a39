"""The training task (model + loss in one module), train step, zero-shot validation and the loop.

Distributed details stay in `train.engine`; this file sees the DeepSpeed engine only through
``engine(...)``, ``engine.backward``, ``engine.step`` and the engine helpers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.manifest import TEXT_FIELDS
from train import engine as ds
from train.checkpoint import adopt_init_checkpoint, load_init_checkpoint
from train.config import TrainConfig
from train.eval_data import eval_batches
from train.frames import normalize_frames
from train.loader import StreamingLoader
from train.loss import OCLLoss
from train.metrics import retrieval_metrics
from train.model import LOGIT_SCALE_MAX, VideoCLIP, VideoCLIPConfig, build_model
from train.model_record import RECORD_KEY, model_record
from train.optim import build_optimizer, build_scheduler, retime_scheduler
from train.pretrained import resolve_pretrained
from train.run_layout import RunLayout
from train.run_outputs import MetricLogger, StepProfiler, wandb_settings
from train.shard_errors import check_limit
from train.text_coverage import term_texts

logger = logging.getLogger(__name__)

KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


class TrainingTask(nn.Module):
    """Model + OCL loss as one module for DeepSpeed (ZeRO-3 hooks need a single forward)."""

    def __init__(self, model: VideoCLIP, loss: OCLLoss, train_text: str = "subtitle"):
        super().__init__()
        self.model, self.loss, self.train_text = model, loss, train_text
        self.text_context = model.clip.context_length

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        padded = F.pad(tokens, (0, self.text_context - tokens.shape[1]))  # after EOT: masked by causality
        return self.model.encode_text(padded).float()

    def forward(self, frames, image=None, subtitle=None, caption=None, text=None):
        """Training: loss dict. Validation (``text`` given): (video, text) embeddings."""
        dtype = self._dtype()
        video = self.model.encode_video(normalize_frames(frames, dtype)).float()
        if text is not None:
            return video, self._text(text)
        features = {"video": video}
        wanted = self.loss.features
        texts = {name: tokens for name, tokens in (("subtitle", subtitle), ("caption", caption)) if name in wanted}
        if "text" in wanted:  # infonce: the configured text member
            texts["text"] = subtitle if self.train_text == "subtitle" else caption
        if texts:  # one text-tower pass for all texts: half the kernel launches of one pass each
            features.update(zip(texts, self._text(torch.cat(list(texts.values()))).split(len(video))))
        if "frame" in wanted:
            features["frame"] = self.model.encode_image(normalize_frames(image, dtype)).float()
        present = {name: has_text(tokens) for name, tokens in texts.items()}
        return self.loss(features, self.model.logit_scale.float(), present)


def has_text(tokens_BL: torch.Tensor) -> torch.Tensor:
    """Per row, whether the text was not empty: more than <sot> <eot> before the zero padding."""
    return (tokens_BL != 0).sum(dim=1) > 2


def register_direct_params(task: nn.Module) -> list[nn.Parameter]:
    """Parameters used outside their own module's forward (ZeRO-3 must gather them for the task)."""
    params = []
    for module in task.modules():
        if any(True for _ in module.children()):
            params.extend(p for p in module.parameters(recurse=False))
    return params


def build_task(cfg: TrainConfig, rank: int, world_size: int) -> TrainingTask:
    cfg = adopt_init_checkpoint(cfg)  # model fields left at auto: the init checkpoint's
    torch.manual_seed(cfg.seed)
    pretrained = resolve_pretrained(cfg.model)  # a tag or hf-hub: name -> its file in the local cache
    model = build_model(VideoCLIPConfig(**{**cfg.model.video_clip_kwargs(), "pretrained": pretrained}))
    if cfg.model.init_checkpoint:
        load_init_checkpoint(model, cfg.model.init_checkpoint)
    if cfg.model.lock_text:
        model.clip.lock_text_tower(unlocked_layers=cfg.model.lock_text_unlocked_layers)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        logger.info("text tower locked: %d parameters frozen", frozen)
    return TrainingTask(model, OCLLoss(cfg.model.loss, rank, world_size), cfg.data.train_text)


# ----------------------------------------------------------------------------- FLOPs / MFU


def flops_per_sample(model: VideoCLIP, num_frames: int, num_texts: int, with_frame: bool) -> float:
    """Analytic training FLOPs (3x forward) of one clip: matmuls and attention, both towers."""
    visual = model.clip.visual
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0]
    layers = len(visual.transformer.resblocks)
    grid = visual.grid_size[0] * visual.grid_size[1]
    proxies = model.cfg.num_proxies

    def video_forward(frames: int) -> float:
        tokens = proxies + frames * grid
        matmul = 2 * tokens * 12 * width * width * layers
        keys = frames * grid * (proxies + grid) + proxies * tokens  # proxy-guided pattern
        attention = 4 * keys * width * layers
        return matmul + attention + 2 * frames * grid * 3 * patch * patch * width

    text_width = model.clip.transformer.width
    text_layers = len(model.clip.transformer.resblocks)
    ctx = model.clip.context_length
    text = 2 * ctx * 12 * text_width**2 * text_layers + 4 * ctx * ctx * text_width * text_layers
    forward = video_forward(num_frames) + num_texts * text + (video_forward(1) if with_frame else 0.0)
    return 3.0 * forward


def peak_flops(cfg: TrainConfig) -> float:
    if cfg.log.peak_tflops > 0:
        return cfg.log.peak_tflops * 1e12
    if ds.device_type() == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return 0.0


# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0
    schedule: dict | None = None
    """``{"global_batch": ...}``: the global batch the run began with (the lr schedule's clock, `retime`)."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ----------------------------------------------------------------------------- step + validation


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def train_step(
    engine, loader: StreamingLoader, grad_accum: int, device: torch.device
) -> tuple[dict, float, list, list]:
    """One optimiser step (grad_accum micro-batches); returns (loss terms, data seconds, digests, clip keys).

    The loss terms stay device tensors: reading them would wait for the GPU every step, so the
    host could not queue the next step's kernels while this one runs. They are read when logged.
    """
    data_seconds, terms, digests, keys = 0.0, {}, [], []
    for _ in range(grad_accum):
        start = time.perf_counter()
        batch = loader.next()
        data_seconds += time.perf_counter() - start
        digests.append(batch["digest"])
        keys.extend(batch["keys"])
        inputs = to_device(batch, device)
        losses = engine(inputs["frames"], image=inputs["image"], subtitle=inputs["subtitle"], caption=inputs["caption"])
        engine.backward(losses["loss"])
        engine.step()
        for name, value in losses.items():
            terms[name] = terms.get(name, 0.0) + value.detach() / grad_accum
    return terms, data_seconds, digests, keys


@torch.no_grad()
def validate(engine, cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> dict:
    """Zero-shot text->video retrieval on the held-out clips (all ranks take part). A clip whose query text
    (``data.eval_text``) is empty is no query, only a candidate; the clips without each text are counted and,
    with the loss terms that read that text, said once per validation (`missing_texts`)."""
    engine.eval()
    videos, texts, indices, present = [], [], [], []
    for batch in eval_batches(cfg.data, rank, world_size):
        video, text = engine(batch["frames"].to(device), text=batch["text"].to(device))
        videos.append(video.float())
        texts.append(text.float())
        indices.append(batch["index"].to(device))
        present.append(batch["has_text"].to(device))
    engine.train()
    video = ds.all_gather_rows(torch.cat(videos)).cpu()
    text = ds.all_gather_rows(torch.cat(texts)).cpu()
    index = ds.all_gather_rows(torch.cat(indices)).cpu()
    has = ds.all_gather_rows(torch.cat(present)).cpu().bool()
    keep = index >= 0
    order = torch.argsort(index[keep])
    video, text, has = video[keep][order], text[keep][order], has[keep][order]
    queries = torch.nonzero(has[:, TEXT_FIELDS.index(cfg.data.eval_text)]).flatten()
    results = {}
    if len(queries):
        results = retrieval_metrics((text[queries] @ video.T).numpy(), queries.tolist(), dsl=True)
    results["clips"] = int(len(video))
    results.update({f"clips_without_{name}": int((~has[:, i]).sum()) for i, name in enumerate(TEXT_FIELDS)})
    if rank == 0:
        for line in missing_texts(results, cfg):
            logger.warning("validation: %s", line)
    return results


def missing_texts(results: dict, cfg: TrainConfig) -> list[str]:
    """Per text that some held-out clips lack: how many, which loss terms read it, and what retrieval did."""
    lines = []
    for name, terms in term_texts(cfg.model.loss, cfg.data.train_text).items():
        missing = results[f"clips_without_{name}"]
        if not missing:
            continue
        line = (
            f"{missing} of {results['clips']} held-out clips have no {name}: loss {cfg.model.loss}'s terms "
            f"{', '.join(terms)} leave such clips out in training"
            + (" (all of them: the terms are skipped)" if missing == results["clips"] else "")
        )
        if name == cfg.data.eval_text:
            line += " and retrieval skips them as queries" if missing < results["clips"] else "; retrieval skipped"
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- the loop


def resume(engine, cfg: TrainConfig, rank: int, world_size: int, universal: str | None) -> tuple[TrainState, dict]:
    """Load the newest checkpoint if any: the train state and the loader's start (`StreamingLoader` arguments).

    Saved by the same number of ranks and workers, every rank takes its own RNG and data state back (exact
    resume); by another, the data positions of every saved rank are remapped onto this run's streams
    (train/stream_remap.py) and the RNGs are seeded from (seed, step, rank)."""
    if cfg.checkpoint.resume != "auto":
        return TrainState(), {}
    client = ds.load_checkpoint(engine, RunLayout(cfg.run_dir).checkpoints, universal)
    if client is None:
        return TrainState(), {}
    state = TrainState(step=client["step"], samples=client["samples"], schedule=client.get("schedule"))
    saved = client["ranks"]
    carry = client.get("data_plan")
    if len(saved) == world_size:
        set_rng_state(saved[rank]["rng"])
    else:
        seed_everything(cfg.seed * 1_000_003 + state.step * 101 + rank)
    data = [r["data"] for r in saved]
    if StreamingLoader.same_streams(data, cfg.data, world_size):
        return state, {"state": data[rank], "carry": carry}
    if rank == 0:
        logger.info(
            "data: the checkpoint was saved by %d ranks x %d workers, this run has %d x %d: remapping its positions",
            len(data),
            len(data[0]["streams"]),
            world_size,
            max(cfg.data.num_workers, 1),
        )
    return state, {"saved": data, "carry": carry}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def retime(engine, cfg: TrainConfig, state: TrainState, samples_per_epoch: int, world_size: int) -> int:
    """The run's total steps at this world size. A run's length is kept in samples: ``max_steps`` (or the
    epochs) counted in the global batch the run began with. After a resume at another global batch the lr
    schedule is retimed to go on by samples seen (`retime_scheduler`)."""
    batch = cfg.global_batch(world_size)
    first = first_batch(state, batch)
    state.schedule = {"global_batch": first}
    first_total = cfg.total_steps(samples_per_epoch, first)
    if first == batch:
        return first_total
    left = max(0, first_total * first - state.samples)
    total = state.step + math.ceil(left / batch)
    step0, samples0 = state.step, state.samples

    def clock(step: int) -> float:
        return (samples0 + (step - step0) * batch) / first

    retime_scheduler(engine.lr_scheduler, clock, first_total, cfg.optim)
    logger.info(
        "lr schedule: global batch %d (the run began with %d): %d steps in all, %d to go, by samples seen",
        batch,
        first,
        total,
        total - state.step,
    )
    return total


def first_batch(state: TrainState, batch: int) -> int:
    """The global batch the run began with: recorded in its checkpoints; a checkpoint saved before the record
    took every step at one batch, ``samples / step``; a fresh run, ``batch``."""
    if state.schedule:
        return state.schedule["global_batch"]
    return state.samples // state.step if state.step else batch


def save(engine, cfg: TrainConfig, state: TrainState, loader: StreamingLoader) -> None:
    rank_state = {"data": loader.state_dict(), "rng": rng_state()}
    shared = {
        "step": state.step,
        "samples": state.samples,
        "schedule": state.schedule,
        "data_plan": loader.carry_state(),
        RECORD_KEY: model_record(engine.module.model.cfg),  # what the checkpoint is, wherever it is copied
    }
    ds.save_checkpoint(
        engine, RunLayout(cfg.run_dir).checkpoints, state.step, rank_state, shared, cfg.checkpoint.keep_last
    )


def universal_source(cfg: TrainConfig, world_size: int) -> str | None:
    """Where the newest checkpoint's universal form is, when it was saved by another number of ranks (collective:
    rank 0 converts it, train/engine.py `to_universal`); None otherwise."""
    if cfg.checkpoint.resume != "auto":
        return None
    folder = RunLayout(cfg.run_dir).checkpoints
    saved = ds.saved_world_size(folder)
    if saved is None or saved == world_size:
        return None
    logger.info(
        "the newest checkpoint was saved by %d ranks, this run has %d: loading its universal form", saved, world_size
    )
    return ds.to_universal(folder)


def train(cfg: TrainConfig, rank: int, world_size: int) -> dict:
    """Build everything, resume if possible, train, validate; returns the last validation metrics."""
    device, run = ds.current_device(), RunLayout(cfg.run_dir)
    wandb = wandb_settings(cfg)  # first: a missing wandb package stops every rank before any work
    probe = StreamingLoader(cfg.data, cfg.seed, rank, world_size)
    samples_per_epoch = probe.samples_per_epoch
    total_steps = cfg.total_steps(samples_per_epoch, cfg.global_batch(world_size))
    del probe
    task = build_task(cfg, rank, world_size)
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, total_steps, cfg.optim)
    ds_config = ds.ds_config(cfg, world_size)
    if rank == 0:
        ds.write_ds_config(ds_config, run)
    universal = universal_source(cfg, world_size)
    engine = ds.initialize(task, optimizer, scheduler, ds_config, register_direct_params(task))
    state, data_start = resume(engine, cfg, rank, world_size, universal)
    total_steps = retime(engine, cfg, state, samples_per_epoch, world_size)
    decode_on = device if cfg.data.decode_device != "cpu" else None
    loader = StreamingLoader(cfg.data, cfg.seed, rank, world_size, **data_start, decode_on=decode_on)
    metrics = MetricLogger(
        run,
        rank,
        total_steps,
        state.step,
        tensorboard=cfg.log.tensorboard,
        progress_bar=cfg.log.progress_bar,
        plots=cfg.log.plots,
        wandb=wandb,
    )
    logger.info(
        "training %d steps (from step %d) on %d rank(s), %d samples per epoch",
        total_steps,
        state.step,
        world_size,
        loader.samples_per_epoch,
    )
    try:
        last_eval = run_loop(engine, cfg, state, loader, metrics, total_steps, rank, world_size, device)
    finally:
        metrics.close()
    return last_eval


def run_loop(engine, cfg, state, loader, metrics, total_steps, rank, world_size, device) -> dict:
    task: TrainingTask = engine.module
    flops = flops_per_sample(task.model, cfg.data.num_frames, 2, "frame" in task.loss.features)
    peak = peak_flops(cfg)
    last_eval: dict = {}
    if cfg.log.eval_at_start and cfg.data.eval and state.step == 0:
        last_eval = validate(engine, cfg, rank, world_size, device)
        metrics.log("eval", 0, last_eval)
    stop = min(total_steps, cfg.stop_at_step or total_steps)
    window_start, window_data, window_samples = time.perf_counter(), 0.0, 0
    profiler = StepProfiler(RunLayout(cfg.run_dir), rank, cfg.log.profile_steps, cfg.log.profile_skip)
    while state.step < stop:
        terms, data_seconds, digests, keys = train_step(engine, loader, cfg.zero.grad_accum_steps, device)
        profiler.step()
        ds.clamp_param_(task.model.logit_scale, 0.0, LOGIT_SCALE_MAX)
        state.step += 1
        step_samples = cfg.global_batch(world_size)
        state.samples += step_samples
        window_data += data_seconds
        window_samples += step_samples
        if state.step % cfg.log.every_steps == 0 or state.step == stop or cfg.log.batch_digests or cfg.log.batch_keys:
            elapsed = time.perf_counter() - window_start
            row = step_row(engine, cfg, terms, loader, elapsed, window_data, window_samples, flops, peak, world_size)
            if cfg.log.batch_digests:
                row["digests"] = ds.all_gather_objects(digests)
            if cfg.log.batch_keys:
                row["keys"] = ds.all_gather_objects(keys)
            metrics.log("train", state.step, row)
            metrics.advance(state.step, {"loss": row["loss"], "samples/s": row["samples_per_s"]})
            check_shard_errors(cfg, loader, row["data/shard_errors"])
            window_start, window_data, window_samples = time.perf_counter(), 0.0, 0
        if cfg.data.eval and (state.step % cfg.log.eval_every_steps == 0 or state.step == total_steps):
            last_eval = validate(engine, cfg, rank, world_size, device)
            metrics.log("eval", state.step, last_eval)
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == stop:
            save(engine, cfg, state, loader)
    profiler.close()
    return last_eval


def check_shard_errors(cfg: TrainConfig, loader: StreamingLoader, errors: int) -> None:
    """At each logged step, on every rank with the same ``errors`` (all ranks' sum): past data.max_shard_errors
    every rank raises TooManyShardErrors together (train/shard_errors.py), none waits on another."""
    check_limit(
        errors,
        cfg.data.max_shard_errors,
        loader.shards_per_epoch,
        lambda: int(ds.all_reduce(loader.shards_begun(), "max")),
        lambda: ds.all_gather_objects(loader.recent_shard_errors),
    )


def _metric_name(term: str) -> str:
    """``loss``, ``loss/<term>``, and the missing-text counts as ``data/without_<text>``, ``data/skipped_<term>``."""
    if term == "loss":
        return term
    kind, _, name = term.partition("/")
    return f"data/{kind}_{name}" if name else f"loss/{term}"


def step_row(engine, cfg, terms, loader, elapsed, data_seconds, samples, flops, peak, world_size) -> dict:
    shard_errors, sample_errors = loader.errors()
    row = {_metric_name(name): float(value) for name, value in terms.items()}
    samples_per_s = samples / max(elapsed, 1e-9)
    row.update(
        {
            "logit_scale": ds.read_param(engine.module.model.logit_scale),
            "lr": engine.get_lr()[0],
            "samples_per_s": samples_per_s,
            "samples_per_s_per_device": samples_per_s / world_size,
            "data_wait_fraction": min(1.0, ds.all_reduce(data_seconds, "max") / max(elapsed, 1e-9)),
            "data/shard_errors": int(ds.all_reduce(shard_errors, "sum")),
            "data/sample_errors": int(ds.all_reduce(sample_errors, "sum")),
            "data/filtered": int(ds.all_reduce(loader.filtered(), "sum")),
        }
    )
    if peak > 0:
        row["mfu"] = samples_per_s / world_size * flops / peak
    return row
