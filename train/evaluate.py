"""Retrieval evaluation of a checkpoint on a test data set: t2v and v2t R@1/5/10, MdR, MnR, with and without DSL.

    python -m train.evaluate --checkpoint runs/ft-msrvtt --data shards/msrvtt/test [--out results.json]

One ordered pass over the data set (manifest order, no distributed padding or truncation). Every
non-empty line of a sample's text member is a query, so a video may have several texts (the
downstream converters store a video's texts one per line in ``subtitle.txt``; ``--text caption``
uses the single caption). DSL numbers use the whole test query set at once (transductive) and are
reported under ``dsl/`` keys, never mixed with the plain ones.

Checkpoints (``--checkpoint``): a training run folder (newest DeepSpeed checkpoint and its
``config.yaml``), a ``checkpoints/`` folder or one tag folder of it, or a weights file (.pt/.pth/.bin
or .safetensors) holding our VideoCLIP state dict or a released CLIP-ViP one (``clipmodel.`` keys).
The model shape comes from ``--config`` (a training YAML), else from the run's ``config.yaml``.
A checkpoint that does not fit that shape is refused with the list of mismatched tensors.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.schema import ClipSample
from pipeline.shards import iter_dataset
from train.config import TrainConfig, load_config
from train.frames import normalize_frames
from train.sample_transform import SampleTransform, decode_batch
from train.tokenizer import get_tokenizer
from train.metrics import retrieval_metrics
from train.model import VideoCLIP, VideoCLIPConfig, build_model
from train.weights import HF_PREFIX, CheckpointKeyError, clipvip_to_ours, read_state_dict

logger = logging.getLogger(__name__)

DS_MODEL_FILE = "mp_rank_00_model_states.pt"
TEXT_FIELDS = ("subtitle", "caption")


# ----------------------------------------------------------------------------- loading a checkpoint


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model ready for inference plus the input shape it was trained with."""

    model: VideoCLIP
    num_frames: int
    image_size: int
    context_length: int
    device: torch.device
    checkpoint: str
    """The weights file actually read."""


class ArchitectureMismatch(ValueError):
    """The checkpoint's tensors do not fit the configured model; the message lists every mismatch."""


def resolve_checkpoint(path: str) -> tuple[str, str | None]:
    """(weights file, config.yaml of its run or None) for a run folder, checkpoints folder, tag folder or file."""
    if os.path.isfile(path):
        sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
        return path, sibling if os.path.exists(sibling) else None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file or folder")
    for ckpt_dir, run_dir in ((os.path.join(path, "checkpoints"), path), (path, os.path.dirname(os.path.abspath(path)))):
        latest = os.path.join(ckpt_dir, "latest")
        if os.path.exists(latest):
            with open(latest) as f:
                tag = f.read().strip()
            return os.path.join(ckpt_dir, tag, DS_MODEL_FILE), _config_near(run_dir)
    if os.path.exists(os.path.join(path, DS_MODEL_FILE)):
        return os.path.join(path, DS_MODEL_FILE), _config_near(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    raise FileNotFoundError(f"checkpoint {path}: neither a run folder (checkpoints/latest), a DeepSpeed checkpoint "
                            f"folder ({DS_MODEL_FILE}) nor a weights file")


def _config_near(run_dir: str) -> str | None:
    candidate = os.path.join(run_dir, "config.yaml")
    return candidate if os.path.exists(candidate) else None


def read_weights(path: str) -> dict[str, Tensor]:
    """A flat state dict: DeepSpeed model states (``module``, our run's own file) or a weights file."""
    if os.path.basename(path) == DS_MODEL_FILE:
        # DeepSpeed pickles non-tensor objects next to the weights; only read files of your own runs.
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        state = loaded.get("module") if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: no 'module' state dict in this DeepSpeed checkpoint")
    else:
        state = read_state_dict(path)
    return {_strip_prefix(key): value for key, value in state.items()}


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model."):  # DataParallel wrappers, then TrainingTask.model
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def match_state(state: dict[str, Tensor], model: VideoCLIP) -> dict[str, Tensor]:
    """``state`` converted/checked against the model; CheckpointKeyError lists every mismatch."""
    expected = model.state_dict()
    if any(key.startswith(HF_PREFIX) for key in state):
        return clipvip_to_ours(state, expected)
    missing = sorted(key for key in expected if key not in state)
    unexpected = sorted(key for key in state if key not in expected)
    mismatched = sorted(f"{key}: checkpoint {list(state[key].shape)}, model {list(value.shape)}"
                        for key, value in expected.items() if key in state and state[key].shape != value.shape)
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(missing, unexpected, mismatched)
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def train_config(config_path: str) -> TrainConfig:
    return load_config(config_path, ["run_dir=unused"])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return torch.device(name)


def load_model(checkpoint: str, config: str | None = None, device: str = "auto", num_frames: int | None = None) -> LoadedModel:
    """Build the model described by the config and load the checkpoint into it (strict)."""
    weights, run_config = resolve_checkpoint(checkpoint)
    config = config or run_config
    if config is None:
        raise ValueError(f"checkpoint {checkpoint}: no config.yaml next to it; pass --config (the training YAML)")
    cfg = train_config(config)
    model = build_model(VideoCLIPConfig(**{**cfg.model.video_clip_kwargs(), "pretrained": None}))
    try:
        model.load_state_dict(match_state(read_weights(weights), model), strict=True)
    except CheckpointKeyError as exc:
        raise ArchitectureMismatch(f"{weights} is not a checkpoint of the model in {config} "
                                   f"({cfg.model.clip_model}, {cfg.model.num_proxies} proxies): {exc}") from exc
    target = pick_device(device)
    model.to(target).eval()
    logger.info("loaded %s (config %s) on %s", weights, config, target)
    return LoadedModel(model=model, num_frames=num_frames or cfg.data.num_frames, image_size=cfg.data.image_size,
                       context_length=cfg.data.context_length, device=target, checkpoint=weights)


# ----------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_frames(loaded: LoadedModel, frames_BTCHW_uint8: np.ndarray | Tensor) -> Tensor:
    """uint8 frames [B, T, 3, S, S] -> L2-normalised video embeddings [B, E] (float32, CPU)."""
    frames = torch.as_tensor(frames_BTCHW_uint8).to(loaded.device)
    return loaded.model.encode_video(normalize_frames(frames)).float().cpu()


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: list[str], batch_size: int = 256) -> Tensor:
    """Texts -> L2-normalised embeddings [N, E] (tokenised to the training context length)."""
    tokenizer = get_tokenizer(loaded.context_length)
    context = loaded.model.clip.context_length
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size])
        tokens = F.pad(tokens, (0, context - tokens.shape[1])).to(loaded.device)
        out.append(loaded.model.encode_text(tokens).float().cpu())
    return torch.cat(out) if out else torch.empty(0, loaded.model.clip.text_projection.shape[1])


def sample_texts(sample: ClipSample, text_field: str) -> list[str]:
    """The queries of a sample: each non-empty line of its text member."""
    raw = sample.subtitle if text_field == "subtitle" else sample.caption
    return [line.strip() for line in raw.splitlines() if line.strip()]


@dataclass(frozen=True, kw_only=True)
class Embedded:
    """Embeddings of a data set in manifest order."""

    clip_ids: list[str]
    videos: Tensor
    """[V, E]"""
    texts: list[str]
    text_embeddings: Tensor
    """[T, E]"""
    text_to_video: list[int]
    """Index of each text's video."""


def video_batches(samples: Iterator[ClipSample], transform: SampleTransform, batch_size: int):
    """(samples, uint8 frames [B, T, 3, S, S]) batches in order."""
    batch: list[ClipSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch, decode_batch(batch, transform)[0].views()[0]
            batch = []
    if batch:
        yield batch, decode_batch(batch, transform)[0].views()[0]


def embed_dataset(loaded: LoadedModel, location: str, text_field: str = "subtitle", batch_size: int = 16,
                  progress: bool = True, max_videos: int | None = None) -> Embedded:
    """One ordered pass: every video and its texts, embedded."""
    from tqdm import tqdm

    transform = SampleTransform(loaded.num_frames, loaded.image_size)
    samples = iter_dataset(location)
    if max_videos is not None:
        samples = (s for i, s in zip(range(max_videos), samples))
    clip_ids, videos, texts, owners = [], [], [], []
    with tqdm(desc="videos", unit="video", disable=not progress, file=sys.stderr) as bar:
        for batch, frames in video_batches(samples, transform, batch_size):
            videos.append(encode_frames(loaded, frames))
            for sample in batch:
                lines = sample_texts(sample, text_field)
                owners += [len(clip_ids)] * len(lines)
                texts += lines
                clip_ids.append(sample.meta.clip_id)
            bar.update(len(batch))
    if not clip_ids:
        raise ValueError(f"{location}: the data set has no samples")
    return Embedded(clip_ids=clip_ids, videos=torch.cat(videos), texts=texts,
                    text_embeddings=encode_texts(loaded, texts), text_to_video=owners)


# ----------------------------------------------------------------------------- evaluation


def evaluate(embedded: Embedded) -> dict:
    """retrieval_metrics (plain and dsl/) plus counts."""
    if not embedded.texts:
        raise ValueError("no query texts: every sample's text member is empty (try --text caption or subtitle)")
    similarity_TV = (embedded.text_embeddings @ embedded.videos.T).numpy()
    results = retrieval_metrics(similarity_TV, embedded.text_to_video, dsl=True)
    results.update({"videos": len(embedded.clip_ids), "texts": len(embedded.texts),
                    "videos_without_text": len(embedded.clip_ids) - len(set(embedded.text_to_video))})
    return results


def format_results(results: dict) -> str:
    rows = ["                         R@1    R@5   R@10    MdR     MnR"]
    for prefix, title in (("", ""), ("dsl/", "DSL (uses the whole test query set at once: transductive)")):
        if title:
            rows.append(title)
        for direction, name in (("t2v", "text->video"), ("v2t", "video->text")):
            key = f"{prefix}{direction}"
            values = [results[f"{key}_r{k}"] for k in (1, 5, 10)] + [results[f"{key}_medr"], results[f"{key}_meanr"]]
            rows.append(f"  {name:<20}" + "".join(f"{v:7.1f}" for v in values))
    rows.append(f"{results['videos']} videos, {results['texts']} texts, {results['videos_without_text']} videos without text")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder, tag folder or weights file")
    p.add_argument("--data", required=True, help="test data set (folder or s3:// prefix with manifest.json)")
    p.add_argument("--config", help="training YAML giving the model shape (default: the run's config.yaml)")
    p.add_argument("--text", choices=TEXT_FIELDS, default="subtitle",
                   help="member holding the queries, one per line (downstream shards: subtitle)")
    p.add_argument("--num-frames", type=int, help="frames per video (default: the training config's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--max-videos", type=int, help="only the first N videos (smoke tests)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames)
        results = evaluate(embed_dataset(loaded, args.data, args.text, args.batch_size, not args.no_progress,
                                         args.max_videos))
    except (ValueError, OSError) as exc:
        print(f"train.evaluate: error: {exc}", file=sys.stderr)
        return 2
    results.update({"checkpoint": loaded.checkpoint, "data": args.data, "text": args.text,
                    "num_frames": loaded.num_frames})
    print(format_results(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
