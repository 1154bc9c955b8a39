"""Where ``model.pretrained`` comes from: a local file, or open_clip weights found in local caches, offline.

Accepted values (docs/model.md, "Pretrained weights"):

- a file: an open_clip state dict (.pt/.pth/.bin/.safetensors) or OpenAI's TorchScript archive;
- a folder holding ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin`` (a hub repo snapshot);
- ``hf-hub:ORG/REPO``: that repo's weights file in huggingface_hub's cache;
- an open_clip pretrained tag of ``model.clip_model`` (``openai``, ``laion2b_s34b_b79k``; see
  ``open_clip.list_pretrained()``): its hub repo in huggingface_hub's cache, else the file of its
  download URL in open_clip's own cache (``~/.cache/clip``).

Nothing is downloaded: the caches are filled beforehand on a machine with network. huggingface_hub's cache
is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (read when resolving, as
huggingface_hub reads it at import). What the source says of its activation (OpenAI's archives and the
``openai`` tags are QuickGELU, a hub repo's open_clip_config.json, our own exports' model record) must
agree with the configured model's, else the weights would run under the other activation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import open_clip
from huggingface_hub import try_to_load_from_cache

from train.model import clip_model_config, is_torchscript_archive
from train.model_record import activation
from train.weights import read_file_record

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""open_clip's weights files in a hub repo, safetensors first (open_clip's own order)."""
HUB_CONFIG = "open_clip_config.json"


@dataclass(frozen=True, kw_only=True)
class PretrainedSource:
    """The file ``model.pretrained`` names and what is known of its activation."""

    path: str
    activation: str | None
    """quick_gelu or gelu when the source says, else None."""
    origin: str
    """Where it was found, for messages."""


def hf_cache_dir() -> str:
    """huggingface_hub's cache folder, from the environment as it is now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME", os.path.join(cache, "huggingface"))), "hub")


def url_cache_dir() -> str:
    """open_clip's cache for weights it downloads by URL (its default ``cache_dir``)."""
    return os.path.expanduser("~/.cache/clip")


def cached_hub_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The first of ``filenames`` in the local cache of hub repo ``repo_id``."""
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir())
        if isinstance(found, str):
            return found
    return None


def hub_activation(repo_id: str) -> str | None:
    """The activation of the repo's cached open_clip_config.json, if it is cached."""
    config = cached_hub_file(repo_id, (HUB_CONFIG,))
    if config is None:
        return None
    with open(config) as f:
        return activation(json.load(f).get("model_cfg", {}))


def from_hub(value: str, repo_id: str, filenames: tuple[str, ...] = WEIGHT_FILES) -> PretrainedSource:
    path = cached_hub_file(repo_id, filenames)
    if path is None:
        raise ValueError(
            f"model.pretrained={value}: {repo_id} is not in the local huggingface_hub cache (looked for "
            f"{' or '.join(filenames)} in {hf_cache_dir()}); download it on a machine with network "
            "(docs/model.md, 'Pretrained weights') or set HF_HUB_CACHE"
        )
    return PretrainedSource(path=path, activation=hub_activation(repo_id), origin=f"hub repo {repo_id}")


def tag_files(hub: str) -> tuple[str, tuple[str, ...]]:
    """(repo id, file names) of a pretrained config's ``hf_hub`` entry ("org/repo/" or "org/repo/file.bin")."""
    repo_id, filename = os.path.split(hub)
    if not filename:
        return repo_id, WEIGHT_FILES
    stem, suffix = os.path.splitext(filename)
    return repo_id, ((f"{stem}.safetensors", filename) if suffix in (".bin", ".pth") else (filename,))


def from_tag(value: str, clip_model: str, tag_cfg: dict[str, Any]) -> PretrainedSource:
    """A pretrained tag of ``clip_model``: its hub repo in the HF cache, else its URL's file in open_clip's."""
    looked = []
    tag_activation = "quick_gelu" if tag_cfg.get("quick_gelu", False) else "gelu"
    origin = f"open_clip's {clip_model} tag {value!r}"
    if tag_cfg.get("hf_hub"):
        repo_id, filenames = tag_files(tag_cfg["hf_hub"])
        path = cached_hub_file(repo_id, filenames)
        if path is not None:
            return PretrainedSource(path=path, activation=tag_activation, origin=origin)
        looked.append(f"{repo_id} ({' or '.join(filenames)}) in {hf_cache_dir()}")
    if tag_cfg.get("url"):
        path = os.path.join(url_cache_dir(), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return PretrainedSource(path=path, activation=tag_activation, origin=origin)
        looked.append(path)
    raise ValueError(
        f"model.pretrained={value}: {origin} is not in the local caches (looked for {'; '.join(looked)}); "
        "download them on a machine with network (docs/model.md, 'Pretrained weights') or pass a file"
    )


def from_path(value: str) -> PretrainedSource:
    """A weights file, or a folder holding open_clip's weights file."""
    path = value
    if os.path.isdir(value):
        found = [os.path.join(value, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(value, name))]
        if not found:
            raise ValueError(f"model.pretrained={value}: a folder without {' or '.join(WEIGHT_FILES)}")
        path = found[0]
    if is_torchscript_archive(path):
        return PretrainedSource(path=path, activation="quick_gelu", origin=f"OpenAI's TorchScript archive {path}")
    record = read_file_record(path)
    return PretrainedSource(path=path, activation=record and record.get("activation"), origin=path)


def find_pretrained(value: str, clip_model: str) -> PretrainedSource:
    """The file ``model.pretrained=value`` names; ValueError naming it and where it looked."""
    if value.startswith(HUB_PREFIX):
        return from_hub(value, value[len(HUB_PREFIX) :].strip("/"))
    if os.path.exists(value):
        return from_path(value)
    tag_cfg = open_clip.get_pretrained_cfg(clip_model, value)
    if tag_cfg:
        return from_tag(value, clip_model, tag_cfg)
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(clip_model)) or "none"
    raise ValueError(
        f"model.pretrained={value}: no such file or folder, and not an open_clip tag of {clip_model} "
        f"(its tags: {tags}) nor hf-hub:ORG/REPO"
    )


def resolve_pretrained(cfg: Any) -> str | None:
    """The local weights file of ``cfg.pretrained`` (a ModelConfig or VideoCLIPConfig), its activation checked."""
    if cfg.pretrained is None:
        return None
    source = find_pretrained(cfg.pretrained, cfg.clip_model)
    configured = activation(clip_model_config(cfg))
    if source.activation is not None and source.activation != configured:
        raise ValueError(
            f"model.pretrained={cfg.pretrained}: {source.origin} was trained with activation {source.activation}, "
            f"model.clip_model {cfg.clip_model} has {configured}: pick the matching open_clip name "
            "(-quickgelu for QuickGELU) or set clip_overrides.quick_gelu"
        )
    return source.path
