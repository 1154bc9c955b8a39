"""Loading model weights from a checkpoint: fine-tuning starts, evaluation and search.

A checkpoint is any of: a training run folder (newest DeepSpeed checkpoint and its ``config.yaml``),
its ``checkpoints/`` folder or one tag folder of it (train/run_layout.py), or a weights file
(.pt/.pth/.bin or .safetensors) holding our VideoCLIP state dict or a released CLIP-ViP one
(``clipmodel.`` keys, converted by train/weights.py). Loading is strict: a checkpoint whose recorded
model (train/model_record.py: in it, else its run's config.yaml, else a released CLIP-ViP checkpoint's
QuickGELU towers) differs from the configured one is refused in one line naming both, and one that does
not fit it is refused with the list of every missing, unexpected and mismatched tensor. Model fields
left at ``auto`` adopt the checkpoint's values.

`load_init_checkpoint` loads a fine-tuning start into a model that training builds
(``model.init_checkpoint``); `load_model` builds the model of a training config and loads a
checkpoint into it for inference (train/evaluate.py, train/search.py).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from train.config import TrainConfig, load_config
from train.model import VideoCLIP, VideoCLIPConfig, build_model
from train.model_record import (
    RECORD_KEY,
    CheckpointRecord,
    adopt,
    auto_fields,
    check_record,
    clipvip_record,
    model_record,
)
from train.run_layout import (
    MODEL_STATES,
    CheckpointFolder,
    RunLayout,
    model_states_in,
    zero3_model_states,
    zero3_optim_states,
)
from train.weights import HF_PREFIX, CheckpointKeyError, clipvip_to_ours, read_file_record, read_state_dict

logger = logging.getLogger(__name__)


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
    """(weights, config.yaml of its run or None) for a run folder, checkpoints folder, tag folder or file.

    The weights are a file, or for ZeRO-3 the tag folder: its weights are split over every rank's files
    and `read_weights` consolidates them. A checkpoint with a file missing raises FileNotFoundError
    naming it (train/run_layout.py shows the layout).
    """
    if os.path.isfile(path):
        sibling = RunLayout(os.path.dirname(os.path.abspath(path))).config
        return path, sibling if os.path.exists(sibling) else None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file or folder")
    parent = os.path.dirname(os.path.abspath(path))
    run = RunLayout(path)
    if os.path.isdir(run.checkpoints.path) or os.path.exists(run.config):
        return tag_weights(latest_tag_dir(run.checkpoints)), _config_near(path)
    folder = CheckpointFolder(path)
    if os.path.exists(folder.latest) or folder.tags():
        return tag_weights(latest_tag_dir(folder)), _config_near(parent)
    if glob.glob(os.path.join(path, "*_states.pt")):
        return tag_weights(path), _config_near(os.path.dirname(parent))
    raise FileNotFoundError(
        f"checkpoint {path}: neither a run folder (checkpoints/latest), a DeepSpeed checkpoint "
        f"folder ({MODEL_STATES} or ZeRO-3's {zero3_model_states(0)}) nor a weights file"
    )


def latest_tag_dir(folder: CheckpointFolder) -> str:
    """The tag folder named by ``latest``; FileNotFoundError when either is missing."""
    if not os.path.isdir(folder.path):
        raise FileNotFoundError(f"checkpoint {folder.path}: no such folder (the run saved no checkpoint)")
    tag = folder.latest_tag()
    if tag is None:
        saved = ", ".join(folder.tags()) or "none"
        raise FileNotFoundError(
            f"checkpoint {folder.latest}: missing (it names the newest checkpoint; tag folders: {saved}; "
            "pass a tag folder to load one of them)"
        )
    if not os.path.isdir(folder.tag_dir(tag)):
        raise FileNotFoundError(f"checkpoint {folder.latest} names {tag}, but {folder.tag_dir(tag)} is missing")
    return folder.tag_dir(tag)


def tag_weights(tag_dir: str) -> str:
    """The model states file of a ZeRO-1/2 tag folder, or the ZeRO-3 tag folder once all its rank files are there."""
    if os.path.exists(model_states_in(tag_dir)):
        return model_states_in(tag_dir)
    rank_files = sorted(glob.glob(os.path.join(tag_dir, zero3_model_states("*"))))
    if not rank_files:
        raise FileNotFoundError(
            f"checkpoint {tag_dir}: no model states: neither {MODEL_STATES} (ZeRO-1/2) nor "
            f"{zero3_model_states('<rank>')} (ZeRO-3)"
        )
    world = _saved_world_size(rank_files[0])
    missing = [
        name
        for rank in range(world)
        for name in (zero3_model_states(rank), zero3_optim_states(rank))
        if not glob.glob(os.path.join(tag_dir, f"*{name}"))  # bf16 runs prefix the optimizer file with bf16_
    ]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {tag_dir}: saved by {world} ranks (ZeRO-3) but missing {', '.join(missing)}"
        )
    return tag_dir


def _saved_world_size(rank_file: str) -> int:
    """The data-parallel world size recorded in a ZeRO-3 rank's model states file (our run's own file)."""
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return int(state["dp_world_size"])


def _config_near(run_dir: str) -> str | None:
    candidate = RunLayout(run_dir).config
    return candidate if os.path.exists(candidate) else None


def read_weights(path: str) -> dict[str, Tensor]:
    """A flat state dict: a ZeRO-3 tag folder, DeepSpeed model states (``module``) or a weights file.

    ZeRO-3 weights are consolidated from every rank's partition of the fp32 master weights by
    DeepSpeed's zero_to_fp32 (train/engine.py, the one module that imports deepspeed, imported here
    only then); ZeRO-1/2 files hold the whole model as it trained (bf16 on GPU, fp32 on CPU).
    """
    if os.path.isdir(path):
        from train.engine import consolidated_state_dict  # deepspeed: ~5 s of imports, ZeRO-3 only

        state = consolidated_state_dict(path)
    elif os.path.basename(path) == MODEL_STATES:
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
            key = key[len(prefix) :]
    return key


def match_state(state: dict[str, Tensor], model: VideoCLIP) -> dict[str, Tensor]:
    """``state`` converted/checked against the model; CheckpointKeyError lists every mismatch."""
    expected = model.state_dict()
    if any(key.startswith(HF_PREFIX) for key in state):
        return clipvip_to_ours(state, expected)
    missing = sorted(key for key in expected if key not in state)
    unexpected = sorted(key for key in state if key not in expected)
    mismatched = sorted(
        f"{key}: checkpoint {list(state[key].shape)}, model {list(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(missing, unexpected, mismatched)
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def stored_record(weights: str) -> dict | None:
    """The model record saved with the weights: DeepSpeed's client_state, or the file's own (train/weights.py)."""
    if os.path.isdir(weights):  # ZeRO-3: every rank's small model states file holds the client_state
        path = sorted(glob.glob(os.path.join(weights, zero3_model_states("*"))))[0]
    elif os.path.basename(weights) == MODEL_STATES:
        path = weights
    else:
        return read_file_record(weights)
    # our own runs' files (DeepSpeed pickles objects); mmap: the tensors are not read
    loaded = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return loaded.get(RECORD_KEY) if isinstance(loaded, dict) else None


def checkpoint_record(
    name: str, weights: str, run_config: str | None, state: dict[str, Tensor] | None = None
) -> CheckpointRecord:
    """The model a checkpoint was trained with: recorded in it, else its run's config.yaml, else, for a
    released CLIP-ViP checkpoint (``state`` in the HF layout), OpenAI CLIP's towers; else unknown."""
    stored = stored_record(weights)
    if stored is not None:
        return CheckpointRecord(name=name, values=stored, source="recorded in it")
    if run_config is not None:
        try:
            return CheckpointRecord(name=name, values=model_record(train_config(run_config).model), source=run_config)
        except ValueError as exc:  # a config.yaml this version cannot read: the tensors still decide
            logger.warning("%s: %s", run_config, exc)
    if state is None and os.path.isfile(weights) and os.path.basename(weights) != MODEL_STATES:
        state = read_state_dict(weights)
    if state is not None and any(key.startswith(HF_PREFIX) for key in state):
        return CheckpointRecord(name=name, values=clipvip_record(state), source="a released CLIP-ViP checkpoint")
    return CheckpointRecord(name=name, values=None)


def adopt_init_checkpoint(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the model fields left at ``auto`` taken from model.init_checkpoint's record, checked
    against that record (ValueError in one line naming both values; the tensors are matched later)."""
    autos = auto_fields(cfg.model)
    path = cfg.model.init_checkpoint
    if not path:
        if autos:
            raise ValueError(
                f"model.{autos[0]}=auto adopts model.init_checkpoint's value, but none is set: set "
                f"model.init_checkpoint, or model.{', model.'.join(autos)} to start without one"
            )
        return cfg
    try:
        found = checkpoint_record(path, *resolve_checkpoint(path))
    except FileNotFoundError as exc:
        raise ValueError(f"model.init_checkpoint: {exc}") from exc
    adopted = dataclasses.replace(cfg, model=adopt(cfg.model, found)) if autos else cfg
    check_record(found, adopted.model)
    return adopted


def load_init_checkpoint(model: VideoCLIP, path: str) -> None:
    """Load a fine-tuning start (ours or a released CLIP-ViP checkpoint) strictly into ``model``.

    Raises ValueError naming the model field whose recorded value differs (train/model_record.py), or
    naming model.init_checkpoint and listing every mismatched tensor.
    """
    try:
        weights, run_config = resolve_checkpoint(path)
        state = read_weights(weights)
        check_record(checkpoint_record(path, weights, run_config, state), model.cfg)
        model.load_state_dict(match_state(state, model), strict=True)
    except FileNotFoundError as exc:
        raise ValueError(f"model.init_checkpoint: {exc}") from exc
    except CheckpointKeyError as exc:
        raise ValueError(
            f"model.init_checkpoint={path}: {weights} does not fit the configured model "
            f"({model.cfg.clip_model}, {model.cfg.num_proxies} proxies): {exc}"
        ) from exc
    logger.info("fine-tuning from %s", weights)


def train_config(config_path: str) -> TrainConfig:
    """A training YAML read for its model and data shape (no run folder is written)."""
    return load_config(config_path, ["run_dir=unused"])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return torch.device(name)


def load_model(
    checkpoint: str, config: str | None = None, device: str = "auto", num_frames: int | None = None
) -> LoadedModel:
    """Build the model described by the config and load the checkpoint into it (strict)."""
    weights, run_config = resolve_checkpoint(checkpoint)
    config = config or run_config
    if config is None:
        raise ValueError(f"checkpoint {checkpoint}: no config.yaml next to it; pass --config (the training YAML)")
    cfg = train_config(config)
    state = read_weights(weights)
    found = checkpoint_record(checkpoint, weights, run_config, state)
    model_cfg = VideoCLIPConfig(**{**adopt(cfg.model, found).video_clip_kwargs(), "pretrained": None})
    check_record(found, model_cfg)
    model = build_model(model_cfg)
    try:
        model.load_state_dict(match_state(state, model), strict=True)
    except CheckpointKeyError as exc:
        raise ArchitectureMismatch(
            f"{weights} is not a checkpoint of the model in {config} "
            f"({model_cfg.clip_model}, {model_cfg.num_proxies} proxies): {exc}"
        ) from exc
    target = pick_device(device)
    model.to(target).eval()
    logger.info("loaded %s (config %s) on %s", weights, config, target)
    return LoadedModel(
        model=model,
        num_frames=num_frames or cfg.data.num_frames,
        image_size=cfg.data.image_size,
        context_length=cfg.data.context_length,
        device=target,
        checkpoint=weights,
    )
