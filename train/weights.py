"""Released CLIP-ViP checkpoints (HF `CLIPModel` layout under "clipmodel.") <-> our VideoCLIP.

CLIP-ViP layout (the checkpoints released with microsoft/XPretrain; docs/model.md, "Weight import /
export"): the HF CLIPModel state dict with the prefix "clipmodel.", plus
    clipmodel.vision_model.embeddings.added_cls            [M-1, D]  <-> proxy_tokens [M-1, D]
    clipmodel.vision_model.embeddings.temporal_embedding   [1, S, D] <-> temporal_embedding [S, D]
Conversions: HF q_proj/k_proj/v_proj (weight [D, D], bias [D]) <-> open_clip's packed
attn.in_proj_weight [3D, D] / in_proj_bias [3D]; HF Linear weights are [out, in] while open_clip's
`visual.proj` and `text_projection` are [in, out] (transposed); HF's 0-dim logit_scale is reshaped
to ours. The HF position_ids buffers are accepted and ignored.

Export to open_clip (`ours_to_open_clip`) keeps the ``clip.`` part of our state dict: the names of
open_clip's CLIP, without the proxy tokens and the temporal embedding (train/export.py).

Import is strict: missing, unexpected and shape-mismatched keys are collected and raised together
in one `CheckpointKeyError`. Files are read with torch.load(weights_only=True) or safetensors.
Written files may carry the model record (train/model_record.py): in the safetensors metadata, or as
``<file>.model.json`` beside a torch.save file (`save_state_dict`, `read_file_record`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

HF_PREFIX = "clipmodel."
OPEN_CLIP_PREFIX = "clip."
"""Our VideoCLIP keeps open_clip's CLIP as ``self.clip`` (train/model.py)."""
RECORD_METADATA = "vidproxy.model"
"""Safetensors metadata key of the model record (train/model_record.py), a JSON string."""
RECORD_SIDECAR = ".model.json"
"""Other weights files carry the record beside them: ``<file>.model.json``."""
IGNORED_HF_KEYS = frozenset(
    {
        "clipmodel.text_model.embeddings.position_ids",
        "clipmodel.vision_model.embeddings.position_ids",
    }
)
ADDED_CLS = "clipmodel.vision_model.embeddings.added_cls"

# open_clip residual-block suffix -> (HF encoder-layer suffixes, conversion kind)
BLOCK_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "ln_1.weight": (("layer_norm1.weight",), "copy"),
    "ln_1.bias": (("layer_norm1.bias",), "copy"),
    "attn.in_proj_weight": (tuple(f"self_attn.{x}_proj.weight" for x in "qkv"), "qkv"),
    "attn.in_proj_bias": (tuple(f"self_attn.{x}_proj.bias" for x in "qkv"), "qkv"),
    "attn.out_proj.weight": (("self_attn.out_proj.weight",), "copy"),
    "attn.out_proj.bias": (("self_attn.out_proj.bias",), "copy"),
    "ln_2.weight": (("layer_norm2.weight",), "copy"),
    "ln_2.bias": (("layer_norm2.bias",), "copy"),
    "mlp.c_fc.weight": (("mlp.fc1.weight",), "copy"),
    "mlp.c_fc.bias": (("mlp.fc1.bias",), "copy"),
    "mlp.c_proj.weight": (("mlp.fc2.weight",), "copy"),
    "mlp.c_proj.bias": (("mlp.fc2.bias",), "copy"),
}

# our key -> (HF key without prefix, conversion kind)
TOP_KEYS: dict[str, tuple[str, str]] = {
    "clip.token_embedding.weight": ("text_model.embeddings.token_embedding.weight", "copy"),
    "clip.positional_embedding": ("text_model.embeddings.position_embedding.weight", "copy"),
    "clip.ln_final.weight": ("text_model.final_layer_norm.weight", "copy"),
    "clip.ln_final.bias": ("text_model.final_layer_norm.bias", "copy"),
    "clip.text_projection": ("text_projection.weight", "transpose"),
    "clip.logit_scale": ("logit_scale", "reshape"),
    "clip.visual.class_embedding": ("vision_model.embeddings.class_embedding", "copy"),
    "clip.visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", "copy"),
    "clip.visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", "copy"),
    "clip.visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", "copy"),
    "clip.visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", "copy"),
    "clip.visual.ln_post.weight": ("vision_model.post_layernorm.weight", "copy"),
    "clip.visual.ln_post.bias": ("vision_model.post_layernorm.bias", "copy"),
    "clip.visual.proj": ("visual_projection.weight", "transpose"),
    "proxy_tokens": ("vision_model.embeddings.added_cls", "copy"),
    "temporal_embedding": ("vision_model.embeddings.temporal_embedding", "unsqueeze"),
}
TOWERS = {
    "clip.transformer.resblocks": "text_model.encoder.layers",
    "clip.visual.transformer.resblocks": "vision_model.encoder.layers",
}
_BLOCK_KEY = re.compile(r"^(clip\.transformer\.resblocks|clip\.visual\.transformer\.resblocks)\.(\d+)\.(.+)$")


class CheckpointKeyError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mismatched key."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [
            f"{name} ({len(keys)}): {keys}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
            if keys
        ]
        super().__init__("checkpoint does not match the model; " + "; ".join(parts))


@dataclass(frozen=True)
class KeyRule:
    """One of our tensors and the HF tensor(s) it is made from."""

    ours: str
    hf: tuple[str, ...]
    kind: str
    """copy | transpose | qkv (3 HF tensors <-> packed) | reshape (0-dim <-> ours) | unsqueeze ([1,S,D] <-> [S,D])"""


def rule_for(our_key: str) -> KeyRule | None:
    """The rule for one of our state-dict keys, or None when it has no CLIP-ViP counterpart."""
    block = _BLOCK_KEY.match(our_key)
    if block:
        tower, index, suffix = block.groups()
        if suffix not in BLOCK_KEYS:
            return None
        hf_suffixes, kind = BLOCK_KEYS[suffix]
        hf_keys = tuple(f"{HF_PREFIX}{TOWERS[tower]}.{index}.{s}" for s in hf_suffixes)
        return KeyRule(our_key, hf_keys, kind)
    if our_key in TOP_KEYS:
        hf_key, kind = TOP_KEYS[our_key]
        return KeyRule(our_key, (HF_PREFIX + hf_key,), kind)
    return None


def key_rules(model_state: Mapping[str, Tensor]) -> list[KeyRule]:
    """Rules covering every key of our state dict; raises if some key has no counterpart."""
    rules = [rule_for(key) for key in model_state]
    uncovered = [key for key, rule in zip(model_state, rules) if rule is None]
    if uncovered:
        raise CheckpointKeyError(
            missing=[],
            unexpected=[],
            mismatched=[f"{key} (no CLIP-ViP counterpart in this model)" for key in uncovered],
        )
    return [rule for rule in rules if rule is not None]


def hf_to_ours(kind: str, tensors: list[Tensor], target_shape: torch.Size) -> Tensor:
    """One of our tensors from its HF tensors."""
    if kind == "qkv":
        if len({t.shape for t in tensors}) != 1:
            raise ValueError("q/k/v shapes differ")
        return torch.cat(tensors, dim=0)
    (tensor,) = tensors
    if kind == "transpose":
        return tensor.t()
    if kind == "reshape":
        return tensor.reshape(target_shape)
    if kind == "unsqueeze":
        if tensor.ndim != 3 or tensor.shape[0] != 1:
            raise ValueError(f"expected [1, S, D], got {list(tensor.shape)}")
        return tensor[0]
    return tensor


def ours_to_hf(kind: str, tensor: Tensor) -> list[Tensor]:
    """The HF tensors for one of ours (fresh contiguous copies, safe for safetensors)."""
    if kind == "qkv":
        parts = list(tensor.chunk(3, dim=0))
    elif kind == "transpose":
        parts = [tensor.t()]
    elif kind == "reshape":
        parts = [tensor.reshape(())]
    elif kind == "unsqueeze":
        parts = [tensor[None]]
    else:
        parts = [tensor]
    return [part.detach().contiguous().clone() for part in parts]


def convert_rule(rule: KeyRule, hf_state: Mapping[str, Tensor], target: Tensor) -> Tensor | None:
    """Our tensor for `rule`, or None when the HF tensors do not convert to the target's shape."""
    try:
        converted = hf_to_ours(rule.kind, [hf_state[key] for key in rule.hf], target.shape)
    except (ValueError, RuntimeError):
        return None
    return converted if converted.shape == target.shape else None


def check_added_cls(hf_state: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> list[str]:
    """With one proxy our model has no proxy_tokens: the checkpoint's added_cls must then be empty."""
    if "proxy_tokens" in model_state or ADDED_CLS not in hf_state:
        return []
    rows = hf_state[ADDED_CLS].shape[0]
    return [] if rows == 0 else [f"{ADDED_CLS} has {rows} rows but the model has num_proxies=1"]


def clipvip_to_ours(hf_state: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert a CLIP-ViP state dict to ours (strict); raises CheckpointKeyError listing all problems."""
    rules = key_rules(model_state)
    used = {key for rule in rules for key in rule.hf} | IGNORED_HF_KEYS | {ADDED_CLS}
    missing = sorted(key for rule in rules for key in rule.hf if key not in hf_state)
    unexpected = sorted(key for key in hf_state if key not in used)
    mismatched = check_added_cls(hf_state, model_state)
    converted: dict[str, Tensor] = {}
    for rule in rules:
        if any(key not in hf_state for key in rule.hf):
            continue
        tensor = convert_rule(rule, hf_state, model_state[rule.ours])
        if tensor is None:
            shapes = [list(hf_state[key].shape) for key in rule.hf]
            mismatched.append(f"{rule.ours} {list(model_state[rule.ours].shape)} <- {list(rule.hf)} {shapes}")
        else:
            converted[rule.ours] = tensor
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(missing, unexpected, mismatched)
    return converted


def ours_to_clipvip(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict in the CLIP-ViP (HF CLIPModel, "clipmodel.") layout."""
    hf_state: dict[str, Tensor] = {}
    for rule in key_rules(model_state):
        hf_state.update(zip(rule.hf, ours_to_hf(rule.kind, model_state[rule.ours])))
    if "proxy_tokens" not in model_state:
        width = model_state["temporal_embedding"].shape[-1]
        hf_state[ADDED_CLS] = model_state["temporal_embedding"].new_zeros(0, width)
    return hf_state


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from .safetensors, or a torch file loaded with weights_only=True (unwraps "state_dict")."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return loaded


def load_clipvip_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a released CLIP-ViP checkpoint into a VideoCLIP (strict)."""
    converted = clipvip_to_ours(read_state_dict(path), model.state_dict())
    model.load_state_dict(converted, strict=True)
    logger.info("loaded CLIP-ViP checkpoint %s (%d tensors)", path, len(converted))


def save_clipvip_checkpoint(model: nn.Module, path: str | Path, record: dict | None = None) -> None:
    """Write a VideoCLIP in the CLIP-ViP layout (.safetensors, else torch.save), with its model record."""
    hf_state = ours_to_clipvip(model.state_dict())
    save_state_dict(hf_state, path, record)
    logger.info("saved CLIP-ViP checkpoint %s (%d tensors)", path, len(hf_state))


def ours_to_open_clip(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The CLIP towers of our state dict as an open_clip CLIP state dict (same names under ``clip.``).

    The proxy tokens and the temporal embedding have no place in open_clip's CLIP and are left out:
    its image tower is then CLIP's own (one class token, no frames).
    """
    return {
        key.removeprefix(OPEN_CLIP_PREFIX): value.detach().contiguous().clone()
        for key, value in model_state.items()
        if key.startswith(OPEN_CLIP_PREFIX)
    }


def save_state_dict(state: Mapping[str, Tensor], path: str | Path, record: dict | None = None) -> None:
    """Tensors as .safetensors, else torch.save of a plain dict (both read with weights_only loading).

    ``record`` (the model record, train/model_record.py) goes into the safetensors metadata, or for
    other files into ``<path>.model.json`` beside them (`read_file_record` reads either back).
    """
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    if Path(path).suffix == ".safetensors":
        metadata = {"format": "pt"}
        if record is not None:
            metadata[RECORD_METADATA] = json.dumps(record, sort_keys=True)
        save_file(tensors, str(path), metadata=metadata)
        return
    torch.save(tensors, path)
    if record is not None:
        with open(f"{path}{RECORD_SIDECAR}", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)


def read_file_record(path: str | Path) -> dict | None:
    """The model record a weights file carries (safetensors metadata or its sidecar), else None."""
    if Path(path).suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(RECORD_METADATA)
        return json.loads(text) if text else None
    sidecar = f"{path}{RECORD_SIDECAR}"
    if not os.path.exists(sidecar):
        return None
    with open(sidecar) as f:
        return json.load(f)
