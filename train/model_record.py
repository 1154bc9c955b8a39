"""The model a checkpoint was trained with, and the check of a configured model against it.

A record is plain JSON-able data (`model_record`):

    clip_model      open_clip model name, e.g. "ViT-B-32-quickgelu"
    clip_overrides  merged into open_clip's config of that name (train/model.py, `clip_model_config`)
    clip_config     the merged open_clip config: embed_dim, tower widths and layers, quick_gelu
    activation      "quick_gelu" or "gelu", as clip_config decides it: open_clip's ``-quickgelu`` names set
                    ``quick_gelu: true``, and so may ``clip_overrides.quick_gelu``
    num_proxies, temporal_slots, attention

Training stores it in DeepSpeed's client_state (``"model"``, train/loop.py `save`) and train.export in the
files it writes (train/weights.py). A checkpoint without one is described by its run's config.yaml; a
released CLIP-ViP checkpoint (HF layout) by its tensors, with OpenAI CLIP's QuickGELU (`clipvip_record`).
`check_record` refuses a configured model whose CLIP config, proxies or temporal slots differ, in one line
naming both values; `adopt` fills in the fields left at ``auto`` from the record. ``attention`` (fused or
dense) is recorded but not compared: both compute the same function.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import open_clip
from torch import Tensor

from pipeline.config import flatten
from train.model import clip_model_config
from train.weights import ADDED_CLS, HF_PREFIX

logger = logging.getLogger(__name__)

AUTO = "auto"
ADOPTABLE = ("clip_model", "num_proxies", "temporal_slots")
"""Model fields that may be ``auto``: the checkpoint's value is adopted (clip_model brings its clip_overrides)."""
RECORD_KEY = "model"
"""The record's key in DeepSpeed's client_state."""
TEMPORAL = HF_PREFIX + "vision_model.embeddings.temporal_embedding"
_HF_VISION_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")
_HF_TEXT_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
_warned: set[str] = set()


def activation(clip_config: Mapping[str, Any]) -> str:
    """The towers' MLP activation as open_clip builds them from this config."""
    return "quick_gelu" if clip_config.get("quick_gelu", False) else "gelu"


def model_record(cfg: Any) -> dict[str, Any]:
    """The record of a model config (VideoCLIPConfig or the training ModelConfig, autos resolved)."""
    clip_config = clip_model_config(cfg)
    return {
        "clip_model": cfg.clip_model,
        "clip_overrides": dict(cfg.clip_overrides),
        "clip_config": clip_config,
        "activation": activation(clip_config),
        "num_proxies": cfg.num_proxies,
        "temporal_slots": cfg.temporal_slots,
        "attention": cfg.attention,
    }


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """What is known of the model a checkpoint was trained with."""

    name: str
    """The checkpoint as the user named it."""
    values: dict[str, Any] | None
    """The record, or None when neither the checkpoint nor a config.yaml beside it says."""
    source: str = ""
    """Where the record came from, for messages."""


# ----------------------------------------------------------------------------- released CLIP-ViP checkpoints


def _hf_signature(state: Mapping[str, Tensor]) -> tuple | None:
    """(embed dim, vision width, patch, image size, vision layers, text width, text layers)."""
    try:
        patch = state[HF_PREFIX + "vision_model.embeddings.patch_embedding.weight"]
        positions = state[HF_PREFIX + "vision_model.embeddings.position_embedding.weight"].shape[0]
        tokens = state[HF_PREFIX + "text_model.embeddings.token_embedding.weight"]
        embed = state[HF_PREFIX + "visual_projection.weight"].shape[0]
    except KeyError:
        return None
    vision_layers = {m.group(1) for key in state if (m := _HF_VISION_LAYER.search(key))}
    text_layers = {m.group(1) for key in state if (m := _HF_TEXT_LAYER.search(key))}
    size = round(math.sqrt(positions - 1)) * patch.shape[-1]
    return (embed, patch.shape[0], patch.shape[-1], size, len(vision_layers), tokens.shape[1], len(text_layers))


def _config_signature(config: Mapping[str, Any]) -> tuple | None:
    try:
        vision, text = config["vision_cfg"], config["text_cfg"]
        return (
            config["embed_dim"],
            vision["width"],
            vision["patch_size"],
            vision["image_size"],
            vision["layers"],
            text["width"],
            text["layers"],
        )
    except (KeyError, TypeError):
        return None


def openai_model_for(state: Mapping[str, Tensor]) -> str | None:
    """The one open_clip ``-quickgelu`` model whose towers have the shapes of this CLIP-ViP state, else None."""
    signature = _hf_signature(state)
    if signature is None:
        return None
    names = [
        name
        for name in open_clip.list_models()
        if name.endswith("-quickgelu") and _config_signature(open_clip.get_model_config(name) or {}) == signature
    ]
    return names[0] if len(names) == 1 else None


def clipvip_record(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """A released CLIP-ViP checkpoint: OpenAI CLIP towers (QuickGELU), proxies and slots from its tensors."""
    name = openai_model_for(state)
    added = state.get(ADDED_CLS)
    temporal = state.get(TEMPORAL)
    return {
        "clip_model": name,
        "clip_overrides": {},
        "clip_config": open_clip.get_model_config(name) if name else None,
        "activation": "quick_gelu",
        "num_proxies": 1 + (added.shape[0] if added is not None else 0),
        "temporal_slots": temporal.shape[1] if temporal is not None and temporal.ndim == 3 else None,
        "attention": None,
    }


# ----------------------------------------------------------------------------- adopt and check


def merge_overrides(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, one level deep (as clip_model_config merges clip_overrides)."""
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in update.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def auto_fields(cfg: Any) -> list[str]:
    return [name for name in ADOPTABLE if getattr(cfg, name) == AUTO]


def adopt(cfg: Any, found: CheckpointRecord) -> Any:
    """``cfg`` (a ModelConfig or VideoCLIPConfig) with its ``auto`` fields set from the checkpoint's record.

    clip_model=auto adopts the checkpoint's clip_model and clip_overrides; overrides set in ``cfg`` apply
    on top of them (and `check_record` then refuses any that change the checkpoint's towers).
    """
    autos = auto_fields(cfg)
    if not autos:
        return cfg
    record = found.values
    if record is None:
        raise ValueError(
            f"model.{autos[0]}=auto adopts the checkpoint's value, but {found.name} records no model "
            f"(nothing in it, no config.yaml beside it): set model.{', model.'.join(autos)}"
        )
    changes: dict[str, Any] = {}
    if "clip_model" in autos:
        if not record.get("clip_model"):
            raise ValueError(
                f"model.clip_model=auto: {found.name} ({found.source}) fits none of open_clip's -quickgelu "
                "models by its tensor shapes: set model.clip_model (and clip_overrides) to its towers"
            )
        changes["clip_model"] = record["clip_model"]
        changes["clip_overrides"] = merge_overrides(record.get("clip_overrides") or {}, cfg.clip_overrides)
    for name in ("num_proxies", "temporal_slots"):
        if name in autos:
            if record.get(name) is None:
                raise ValueError(f"model.{name}=auto: {found.name} ({found.source}) does not say: set model.{name}")
            changes[name] = record[name]
    logger.info("model from %s (%s): %s", found.name, found.source, changes)
    return dataclasses.replace(cfg, **changes)


def describe(record: Mapping[str, Any]) -> str:
    """``ViT-B-32-quickgelu (activation quick_gelu)``, with ``+ clip_overrides`` when there are some."""
    name = record.get("clip_model") or "OpenAI CLIP"
    overrides = " + clip_overrides" if record.get("clip_overrides") else ""
    return f"{name}{overrides} (activation {record['activation']})"


def config_differences(recorded: Mapping[str, Any], configured: Mapping[str, Any]) -> str:
    """``vision_cfg.width 64 vs 128, ...``: the open_clip config keys whose values differ."""
    old, new = flatten(dict(recorded)), flatten(dict(configured))
    keys = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    return ", ".join(f"{key} {old.get(key, '(unset)')} vs {new.get(key, '(unset)')}" for key in keys)


def clip_mismatch(found: CheckpointRecord, wanted: Mapping[str, Any]) -> str | None:
    record = found.values
    if record.get("clip_config") is not None:
        if record["clip_config"] == wanted["clip_config"]:
            return None
    elif record.get("activation") in (None, wanted["activation"]):
        return None
    detail = ""
    if record.get("clip_config") is not None and describe(record) == describe(wanted):
        detail = f"; they differ in {config_differences(record['clip_config'], wanted['clip_config'])}"
    return (
        f"model.clip_model: the checkpoint {found.name} ({found.source}) was trained with {describe(record)}, "
        f"this config has {describe(wanted)}{detail}: set model.clip_model=auto to adopt the checkpoint's, "
        "or load a checkpoint of this model"
    )


def record_mismatches(found: CheckpointRecord, cfg: Any) -> list[str]:
    """One message per configured field that differs from the checkpoint's record."""
    wanted = model_record(cfg)
    problems = [clip_mismatch(found, wanted)]
    for name in ("num_proxies", "temporal_slots"):
        value = found.values.get(name)
        if value is not None and value != wanted[name]:
            problems.append(
                f"model.{name}: the checkpoint {found.name} ({found.source}) was trained with {value}, "
                f"this config has {wanted[name]}: set model.{name}=auto to adopt the checkpoint's"
            )
    return [problem for problem in problems if problem]


def check_record(found: CheckpointRecord, cfg: Any) -> None:
    """Refuse (ValueError, one line) a configured model that differs from the checkpoint's record.

    Without a record the tensors are still matched by name and shape, but an activation change cannot be
    seen there: that is said once per checkpoint.
    """
    if found.values is None:
        if found.name not in _warned:
            _warned.add(found.name)
            logger.warning(
                "%s records no model (nothing in it, no config.yaml beside it): its activation (gelu or "
                "quick_gelu) could not be checked against this config's %s; tensors are matched by name and shape",
                found.name,
                describe(model_record(cfg)),
            )
        return
    problems = record_mismatches(found, cfg)
    if problems:
        raise ValueError("; ".join(problems))
