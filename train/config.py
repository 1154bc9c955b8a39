"""Training configuration: one dataclass per concern, composed into `TrainConfig`.

Precedence: dataclass defaults, then a YAML file, then dotted CLI overrides such as
``optim.lr=1e-5 data.train=[s3://b/a,s3://b/b]`` (values are parsed as YAML scalars/lists).
Every section validates itself in ``__post_init__`` and raises ``ValueError`` naming the field;
`TrainConfig` checks the values that must agree across sections. The resolved config is dumped
to ``<run_dir>/config.yaml`` by the entry point.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field

import yaml

from pipeline import config
from train.run_layout import RunLayout
from train.sample_filter import SampleFilter
from train.shard_errors import parse_limit

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
DECODERS = ("simplejpeg", "torchvision", "pillow")
TAR_READERS = ("ours", "webdataset")
DECODE_DEVICES = ("cpu", "cuda")
EVAL_TEXTS = ("caption", "subtitle")
TEXT_LINES = ("all", "sample")
LOSSES = ("vs", "a", "b", "c", "d", "infonce")
RESUME_MODES = ("auto", "never")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


@dataclass(kw_only=True)
class ModelConfig:
    """The network (fields of train.model.VideoCLIPConfig) and the loss variant."""

    clip_model: str = "ViT-B-32"
    """open_clip model name, e.g. ViT-B-32, ViT-B-16 (OpenAI weights want the -quickgelu names: QuickGELU);
    auto: model.init_checkpoint's, with its clip_overrides (so its activation)."""
    num_proxies: int | str = 4
    """M video proxy tokens (proxy 0 is CLIP's class embedding); auto: model.init_checkpoint's."""
    temporal_slots: int | str = 12
    """Slots of the temporal embedding, resampled to the frame count; auto: model.init_checkpoint's."""
    attention: str = "fused"
    """fused (two mask-free SDPA calls) or dense (one SDPA with an N x N mask, original-style cost)."""
    grad_checkpointing: bool = False
    """Recompute transformer blocks in backward."""
    pretrained: str | None = None
    """CLIP weights to start from: a file (open_clip state dict or OpenAI TorchScript), hf-hub:ORG/REPO or an
    open_clip tag of clip_model (openai, laion2b_s34b_b79k, ...) from the local caches (None: random init)."""
    expect_pretrained: bool = False
    """The towers are meant to start pretrained: starting from random weights (no pretrained, no
    init_checkpoint) warns at start and says so in the run's config.yaml."""
    clip_overrides: dict = field(default_factory=dict)
    """Merged into open_clip's model config (embed_dim, quick_gelu, vision_cfg, text_cfg)."""
    logit_scale_init: float = 4.60
    """Initial log logit scale."""
    loss: str = "d"
    """OCL variant of train.loss (d = the final CLIP-ViP loss; infonce = video <-> data.train_text, fine-tuning)."""
    lock_text: bool = False
    """Freeze the text tower (LiT-style, open_clip's lock_text_tower); the logit scale stays trainable."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave this many layer groups at the top of the text tower trainable."""
    init_checkpoint: str | None = None
    """Fine-tuning start: a run folder, checkpoints/tag folder or weights file of ours, or a released
    CLIP-ViP checkpoint (loaded strictly after `pretrained`; a resumed run's own checkpoint wins); the
    model it records must match clip_model, num_proxies and temporal_slots (or those be auto)."""

    def __post_init__(self) -> None:
        for name in ("num_proxies", "temporal_slots"):
            value = getattr(self, name)
            _check(
                value == "auto" or (isinstance(value, int) and value >= 1),
                f"model.{name}",
                f"must be an integer >= 1 or auto, got {value!r}",
            )
        _check(self.loss in LOSSES, "model.loss", f"must be one of {LOSSES}, got {self.loss!r}")
        _check(
            self.init_checkpoint is None or bool(self.init_checkpoint),
            "model.init_checkpoint",
            "must be a path or null",
        )
        _check(self.pretrained is None or bool(self.pretrained), "model.pretrained", "must be a path, a tag or null")
        _check(
            self.lock_text_unlocked_layers >= 0,
            "model.lock_text_unlocked_layers",
            f"must be >= 0, got {self.lock_text_unlocked_layers}",
        )
        _check(
            self.lock_text or self.lock_text_unlocked_layers == 0,
            "model.lock_text_unlocked_layers",
            "is only used with model.lock_text=true",
        )

    def random_start_note(self) -> str | None:
        """The warning for a run whose towers are meant to be pretrained but start from random weights."""
        if not self.expect_pretrained or self.pretrained or self.init_checkpoint:
            return None
        return (
            f"model.pretrained is not set: the {self.clip_model} towers start from random weights, though this "
            "config expects pretrained ones (model.expect_pretrained); set model.pretrained to a weights file, an "
            "open_clip tag (openai) or hf-hub:ORG/REPO (docs/model.md, 'Pretrained weights'), or "
            "model.expect_pretrained=false to start from random weights on purpose"
        )

    def video_clip_kwargs(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("loss", "init_checkpoint", "lock_text", "lock_text_unlocked_layers", "expect_pretrained")
        }


@dataclass(kw_only=True)
class DataConfig:
    """The streaming loader: sources, sampling, decode and tokenisation."""

    train: list = field(default_factory=list)
    """Sources to train on, local, file:// or s3://: manifests, data set folders or shard URL lists
    (shard-{000000..000099}-000.tar); open_clip's a::b is the list [a, b] (train/shard_sources.py)."""
    weights: list | None = None
    """Sampling weight per train source, also as open_clip's 3::1 (None: in proportion to their sample counts)."""
    train_num_samples: int | None = None
    """Samples per epoch (open_clip's --train-num-samples); needed when a source has no manifest or sizes.json."""
    eval: list = field(default_factory=list)
    """Held-out sources for zero-shot retrieval, written as data.train (empty: no evaluation)."""
    eval_text: str = "caption"
    """Which text is the retrieval query: caption or subtitle."""
    train_text: str = "subtitle"
    """Text member the infonce loss pairs with the video: subtitle or caption."""
    min_text_coverage: float = 0.5
    """Training stops at the start when a train source's manifest says fewer of its clips than this have a
    text the loss reads (train/text_coverage.py); 0: no check."""
    text_lines: str = "all"
    """all: a text member is used whole; sample: training picks one non-empty line per visit (seeded by
    the sample's position), evaluation takes the first line (downstream shards: one text per line)."""
    eval_max_samples: int = 1000
    """Cap on held-out clips (the first ones in manifest order)."""
    batch_size: int = 32
    """Clips per rank per micro-step."""
    num_frames: int = 12
    """Frames per clip fed to the model."""
    image_size: int = 224
    """Frames are resized (squashed) to image_size x image_size."""
    context_length: int = 70
    """Text tokens (open_clip tokenizer); padded with zeros to the model's context."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    shards_per_window: int = 4
    """Shards read interleaved by one worker; the unit of deterministic shuffling."""
    shuffle_buffer: int = 256
    """Sample-level shuffle buffer (raw samples, decoded after the buffer)."""
    decoder: str = "simplejpeg"
    """JPEG decoder: simplejpeg (libjpeg-turbo straight into the batch tensor, fastest), torchvision or
    pillow; frames not stored at image_size get a bicubic antialiased resize."""
    decode_device: str = "cpu"
    """cpu: the loader (its DataLoader workers) decodes the JPEGs; cuda: the workers ship them as bytes and the
    training process decodes each batch on its GPU with nvJPEG (train/device_decode.py; data.decoder: simplejpeg)."""
    tar_reader: str = "ours"
    """Tar parser for shards: ours (pipeline/shards.py, the fastest) or webdataset (its tarfile-based one, for tars
    written by another tool that ours refuses); the same samples in the same order (train/tar_readers.py)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    shuffle_frames: bool = False
    """Permute frame order (a no-temporal-order baseline; off for real training)."""
    max_shard_errors: str = "5%"
    """Shard errors (missing, refused, unreachable, damaged; all ranks) allowed per epoch begun: a count ("10") or a
    percentage of an epoch's shards ("5%"); past it every rank stops at the next logged step (train/shard_errors.py)."""
    filter: str = ""
    """Train only on samples whose quality scores pass this expression, checked before their frames are decoded,
    e.g. "motion > 0.01 and cuts == 0" (train/sample_filter.py: names, numbers, comparisons, and/or/not; a sample
    without a named score is left out). Empty: every sample. Held-out data is never filtered."""

    def __post_init__(self) -> None:
        self.train, self.eval = _split_sources(self.train), _split_sources(self.eval)
        for name, sources in (("data.train", self.train), ("data.eval", self.eval)):
            unread = [source for source in sources if source.startswith("[")]
            if unread:
                raise ValueError(
                    f"{name}: {unread[0]!r} is a list YAML could not read (braces and commas inside [...] need "
                    "quotes): write one source bare, several as a::b, or quote each: ['a-{0..9}.tar','b']"
                )
        if isinstance(self.weights, str):
            parts = self.weights.split("::")
            _check(all(_is_number(w) for w in parts), "data.weights", f"must be numbers, got {self.weights!r}")
            self.weights = [float(w) for w in parts]
        if self.weights is not None:
            _check(
                len(self.weights) == len(self.train),
                "data.weights",
                f"{len(self.weights)} weights for {len(self.train)} train sources",
            )
            _check(
                all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                "data.weights",
                f"must be non-negative with a positive sum, got {self.weights}",
            )
        _check(self.eval_text in EVAL_TEXTS, "data.eval_text", f"must be one of {EVAL_TEXTS}")
        _check(
            self.train_text in EVAL_TEXTS, "data.train_text", f"must be one of {EVAL_TEXTS}, got {self.train_text!r}"
        )
        _check(
            self.text_lines in TEXT_LINES, "data.text_lines", f"must be one of {TEXT_LINES}, got {self.text_lines!r}"
        )
        _check(
            0 <= self.min_text_coverage <= 1,
            "data.min_text_coverage",
            f"must be a fraction in [0, 1], got {self.min_text_coverage}",
        )
        _check(self.decoder in DECODERS, "data.decoder", f"must be one of {DECODERS}, got {self.decoder!r}")
        _check(
            self.decode_device in DECODE_DEVICES,
            "data.decode_device",
            f"must be one of {DECODE_DEVICES}, got {self.decode_device!r}",
        )
        _check(
            self.decode_device == "cpu" or self.decoder == "simplejpeg",
            "data.decoder",
            f"{self.decoder} would not be used: with data.decode_device={self.decode_device} the GPU decodes (nvJPEG); "
            "leave data.decoder at simplejpeg",
        )
        _check(
            self.tar_reader in TAR_READERS, "data.tar_reader", f"must be one of {TAR_READERS}, got {self.tar_reader!r}"
        )
        for name in (
            "batch_size",
            "num_frames",
            "image_size",
            "context_length",
            "shards_per_window",
            "shuffle_buffer",
            "prefetch_factor",
            "eval_max_samples",
        ):
            _check(getattr(self, name) >= 1, f"data.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(
            self.train_num_samples is None or self.train_num_samples >= 1,
            "data.train_num_samples",
            f"must be >= 1 or null, got {self.train_num_samples}",
        )
        _check(self.context_length >= 3, "data.context_length", "must hold at least SOT, one token and EOT")
        self.max_shard_errors = str(self.max_shard_errors).strip()  # YAML reads 10 as a number
        parse_limit(self.max_shard_errors)  # a ValueError naming data.max_shard_errors
        _check(isinstance(self.filter, str), "data.filter", f"must be an expression string, got {self.filter!r}")
        if self.filter.strip():
            SampleFilter(self.filter)  # a ValueError naming data.filter and the reason


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split_sources(value: str | list) -> list[str]:
    """Sources as a list: a string is one source; ``a::b`` (open_clip's separator) is two."""
    return [part for item in ([value] if isinstance(value, str) else value) for part in str(item).split("::")]


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the warmup + cosine schedule (defaults: the CLIP-ViP paper's post-pretraining settings)."""

    lr: float = 5e-6
    """Peak learning rate."""
    min_lr: float = 1e-8
    """Floor of the cosine decay."""
    betas: tuple = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """Decoupled weight decay of the decayed group."""
    decay_all: bool = False
    """Also decay norms, embeddings, proxies (the original's accidental behaviour); biases and logit scale never."""
    warmup_fraction: float = 0.01
    """Fraction of the total steps with linear warmup."""
    grad_clip: float = 5.0
    """Global gradient-norm clip (0 disables)."""
    logit_scale_lr_mul: float = 1.0
    """Learning-rate multiplier of the logit scale."""
    embedding_lr_mul: float = 1.0
    """Learning-rate multiplier of the embedding tables (token, position, class, temporal) and proxies."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two values in [0, 1), got {self.betas}",
        )
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_fraction < 1, "optim.warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.logit_scale_lr_mul > 0, "optim.logit_scale_lr_mul", "must be > 0")
        _check(self.embedding_lr_mul > 0, "optim.embedding_lr_mul", "must be > 0")


@dataclass(kw_only=True)
class ZeroConfig:
    """DeepSpeed: ZeRO stage, precision, accumulation."""

    stage: int = 1
    """ZeRO stage 1, 2 or 3."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    grad_accum_steps: int = 1
    """Micro-steps per optimiser step."""
    grad_accum_dtype: str = "fp32"
    """Gradient accumulation dtype under bf16 (fp32 avoids drift)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward."""
    extra: dict | str | None = None
    """DeepSpeed settings the config does not model (offload, monitors, comms logging, ...), merged over the
    generated JSON: a JSON or YAML file (read at load, so the run's config.yaml keeps its content) or a
    mapping (zero.extra.wall_clock_breakdown=true). Keys the config sets are refused, naming the setting to
    use, unless their value is "auto" (docs/training.md, "DeepSpeed settings")."""

    def __post_init__(self) -> None:
        _check(self.stage in (1, 2, 3), "zero.stage", f"must be 1, 2 or 3, got {self.stage}")
        _check(self.precision in PRECISIONS, "zero.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.grad_accum_steps >= 1, "zero.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        _check(self.grad_accum_dtype in ("fp32", "bf16"), "zero.grad_accum_dtype", "must be fp32 or bf16")
        if isinstance(self.extra, str):
            self.extra = _read_fragment(self.extra)
        _check(self.extra is None or isinstance(self.extra, dict), "zero.extra", "must be a file or a mapping")
        conflicts = [f"{key} -> use {MODELLED_DEEPSPEED_KEYS[m]}" for key, m in _modelled_keys(self.extra or {})]
        _check(not conflicts, "zero.extra", f'keys the config sets: {"; ".join(conflicts)} (or give "auto")')


MODELLED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.batch_size and zero.grad_accum_steps (their product times the ranks)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "zero.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "zero.stage",
    "zero_optimization.overlap_comm": "zero.overlap_comm",
    "bf16.enabled": "zero.precision",
    "bfloat16.enabled": "zero.precision",
    "fp16.enabled": "zero.precision (bf16 or fp32; fp16 is not supported)",
    "torch_autocast": "zero.precision",
    "amp": "zero.precision",
    "data_types.grad_accum_dtype": "zero.grad_accum_dtype",
    "seed": "seed",
    "optimizer": "optim.* (the trainer builds AdamW; DeepSpeedCPUAdam under zero_optimization.offload_optimizer)",
    "scheduler": "optim.lr, optim.min_lr, optim.warmup_fraction (the trainer's warmup + cosine schedule)",
    "zero_allow_untested_optimizer": "nothing: the trainer sets it (DeepSpeed does not build its optimizer)",
    "activation_checkpointing": "model.grad_checkpointing (DeepSpeed's section only configures "
    "deepspeed.checkpointing, which the model does not call)",
}
"""DeepSpeed JSON keys (dotted) that the config decides (`deepspeed_json`), and what to set instead."""


def _read_fragment(path: str) -> dict:
    """A DeepSpeed JSON or YAML fragment file as a mapping (ValueError naming the file)."""
    if not os.path.isfile(path):
        raise ValueError(f"zero.extra: {path!r} is not a file")
    with open(path) as f:
        try:
            loaded = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (ValueError, yaml.YAMLError) as exc:
            raise ValueError(
                f"zero.extra: {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"zero.extra: {path!r} must hold a mapping")
    return loaded


def _modelled_keys(extra: dict) -> list[tuple[str, str]]:
    """(dotted key of ``extra``, modelled key it sets) for every value other than "auto" under a modelled key."""
    out = []
    for key, value in config.flatten(extra).items():
        modelled = next((m for m in MODELLED_DEEPSPEED_KEYS if key == m or key.startswith(m + ".")), None)
        if modelled is not None and value != "auto":
            out.append((key, modelled))
    return out


@dataclass(kw_only=True)
class CheckpointConfig:
    """DeepSpeed checkpoints (saved by every rank) and resume."""

    every_steps: int = 1000
    """Save every this many optimiser steps (and at the end)."""
    keep_last: int = 3
    """Keep only the newest N checkpoints."""
    resume: str = "auto"
    """auto: continue from <run_dir>/checkpoints if present; never: start fresh."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "checkpoint.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")
        _check(self.resume in RESUME_MODES, "checkpoint.resume", f"must be one of {RESUME_MODES}")


@dataclass(kw_only=True)
class LogConfig:
    """Metrics, progress bar, evaluation cadence."""

    every_steps: int = 10
    """Write a metrics row every this many steps."""
    eval_every_steps: int = 1000
    """Zero-shot retrieval every this many steps (and at the end)."""
    eval_at_start: bool = False
    """Also evaluate before the first step."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard events on rank 0."""
    wandb: bool = False
    """Log to Weights & Biases on rank 0 (pip install -e '.[wandb]'; WANDB_MODE=offline works without a login)."""
    wandb_project: str | None = None
    """W&B project (None: WANDB_PROJECT, else vidproxy)."""
    wandb_entity: str | None = None
    """W&B entity, a user or team (None: WANDB_ENTITY, else the login's default)."""
    wandb_name: str | None = None
    """W&B run name (None: WANDB_NAME, else the run folder's name); a resumed run continues its W&B run."""
    wandb_tags: list = field(default_factory=list)
    """W&B run tags."""
    plots: bool = True
    """Write loss/recall PNGs into the run folder."""
    batch_digests: bool = False
    """Record a digest of every rank's batch per step: keys, frame indices, texts (used by the resume tests)."""
    batch_keys: bool = False
    """Record every rank's clip keys per step in metrics.jsonl (sample accounting across a resume)."""
    peak_tflops: float = 0.0
    """Accelerator peak TFLOP/s for MFU (0: auto for known GPUs, no MFU on CPU)."""
    profile_steps: int = 0
    """Profile this many steps with torch.profiler on rank 0 (0: off); writes profile.txt (op tables)
    and profile_trace.json (Perfetto / chrome://tracing) into the run folder."""
    profile_skip: int = 5
    """Steps left unprofiled first (loader start-up, kernel selection), plus one profiler warm-up step."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "log.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.eval_every_steps >= 1, "log.eval_every_steps", f"must be >= 1, got {self.eval_every_steps}")
        _check(self.peak_tflops >= 0, "log.peak_tflops", "must be >= 0")
        _check(self.profile_steps >= 0, "log.profile_steps", f"must be >= 0, got {self.profile_steps}")
        _check(self.profile_skip >= 0, "log.profile_skip", f"must be >= 0, got {self.profile_skip}")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs."""

    run_dir: str
    """Output folder: config, ds_config.json, checkpoints, metrics, plots."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    """Seeds the model init, the shard order, the shuffle buffer and frame jitter."""
    epochs: float = 1.0
    """Passes over the train sources' total samples (sets the schedule length)."""
    max_steps: int | None = None
    """Total optimiser steps (overrides epochs)."""
    stop_at_step: int | None = None
    """Stop (after checkpointing) at this step without changing the schedule: time-sliced jobs."""

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir", "must be set")
        _check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.stop_at_step is None or self.stop_at_step >= 1, "stop_at_step", "must be >= 1")
        self._check_cross_section()

    def _check_cross_section(self) -> None:
        vision_size = self.model.clip_overrides.get("vision_cfg", {}).get("image_size")
        if vision_size is not None and vision_size != self.data.image_size:
            raise ValueError(
                f"data.image_size={self.data.image_size} conflicts with "
                f"model.clip_overrides.vision_cfg.image_size={vision_size}"
            )
        text_ctx = self.model.clip_overrides.get("text_cfg", {}).get("context_length", 77)
        if self.data.context_length > text_ctx:
            raise ValueError(
                f"data.context_length={self.data.context_length} exceeds the text tower's context_length={text_ctx}"
            )
        if self.stop_at_step is not None and self.max_steps is not None and self.stop_at_step > self.max_steps:
            raise ValueError(f"stop_at_step={self.stop_at_step} is beyond max_steps={self.max_steps}")

    def global_batch(self, world_size: int) -> int:
        """Samples per optimiser step over all ranks."""
        return self.data.batch_size * world_size * self.zero.grad_accum_steps

    def total_steps(self, samples_per_epoch: int, global_batch: int) -> int:
        """Optimiser steps of the run at ``global_batch`` samples a step: max_steps, or epochs over the samples."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * samples_per_epoch / global_batch))


def deepspeed_json(cfg: TrainConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON of a run, every value explicit (DeepSpeed's code default for
    ``gradient_clipping`` is 0 = off, so clipping and accumulation are always written out).

    Plain data: the engine (`train.engine.ds_config`) decides ``bf16`` from the device.
    """
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.zero.grad_accum_steps,
        "train_batch_size": cfg.global_batch(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": cfg.zero.stage,
            "overlap_comm": cfg.zero.overlap_comm,
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Warn"},
        "seed": cfg.seed,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": cfg.zero.grad_accum_dtype}
    return config


# ----------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- dotted overrides; validated (pipeline/config.py)."""
    values = config.load_values(path, overrides)
    if "run_dir" not in values:
        raise ValueError("run_dir: required (set it in the YAML or pass run_dir=...)")
    return config.build(TrainConfig, values)


# Settings a resumed run may change: where output goes, how often it is written, evaluation, the
# stopping point, and how the data is split over ranks (the world size may change too: the data positions are
# remapped, train/stream_remap.py, and the lr schedule goes on by samples). Everything else decides the model,
# the optimiser layout or the data order.
RESUME_FREE = (
    "run_dir",
    "data.num_workers",
    "data.batch_size",
    "data.tar_reader",
    "data.decode_device",
    "zero.grad_accum_steps",
    "max_steps",
    "stop_at_step",
    "log.",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "data.eval",
    "data.eval_text",
    "data.eval_max_samples",
    "model.expect_pretrained",
)


def resume_conflicts(saved: dict, cfg: TrainConfig) -> list[str]:
    """'key: saved -> new' for every setting that differs from a saved run's config and must not."""
    old, new = config.flatten(saved), config.flatten(config.to_dict(cfg))
    out = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUME_FREE) or old.get(key) == new.get(key):
            continue
        out.append(f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}")
    return out


def check_resumable(cfg: TrainConfig) -> None:
    """Refuse to resume the checkpoints in cfg.run_dir under a config that changes the run (ValueError)."""
    run = RunLayout(cfg.run_dir)
    saved_path = run.config
    has_checkpoint = os.path.exists(run.checkpoints.latest)
    if cfg.checkpoint.resume != "auto" or not has_checkpoint or not os.path.exists(saved_path):
        return
    try:  # through the loader, so settings added since then compare as their defaults
        saved = config.to_dict(load_config(saved_path, []))
    except ValueError:
        with open(saved_path) as f:
            saved = yaml.safe_load(f) or {}
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise ValueError(
            f"run_dir={cfg.run_dir} holds checkpoints of a run with other settings ("
            + "; ".join(conflicts)
            + "): resume with the same values, use a new run_dir, or pass "
            "checkpoint.resume=never to start over there"
        )


def dump_config(cfg: TrainConfig, path: str, notes: tuple[str, ...] | list[str] = ()) -> None:
    """The resolved config as YAML; ``notes`` (warnings about the run) lead it as ``# note:`` comment lines."""
    config.dump_yaml(config.to_dict(cfg), path, notes)
