"""What the two model stages share (captions.py, asr.py): checking a local transformers model folder before
any work, loading its model and processor, and the torch device and threads of the process that runs it."""

from __future__ import annotations

import logging
import os

from pipeline import storage

log = logging.getLogger(__name__)

LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError)
"""What transformers raises for a folder whose files do not load."""


def check_model_folder(path: str, what: str):
    """The model's transformers config, or a ValueError naming the path and the reason."""
    from transformers import AutoConfig

    if storage.has_scheme(path):
        raise ValueError(f"{what} model {path}: must be a local folder (present on every node), not a URI")
    if not os.path.isdir(path):
        raise ValueError(f"{what} model {path}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what} model {path}: no config.json (not a transformers model folder)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{what} model {path}: unreadable config ({exc})") from exc


def check_model_kind(path: str, what: str, mapping, kind: str) -> None:
    """The folder must hold a model of a transformers auto ``mapping``; ``kind`` says what was expected."""
    config = check_model_folder(path, what)
    if type(config) not in mapping:
        raise ValueError(f"{what} model {path}: a {config.model_type!r} model is not {kind}")


def load_processor(path: str, what: str, *parts: str):
    """The folder's processor; a ValueError naming the folder when it does not load or lacks one of ``parts``."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except LOAD_ERRORS as exc:
        raise ValueError(f"{what} model {path}: no usable processor ({exc})") from exc
    if not all(hasattr(processor, part) for part in parts):
        names = " and ".join(part.replace("_", " ") for part in parts)
        raise ValueError(f"{what} model {path}: its processor has no {names}")
    return processor


def load_model(auto_class, path: str, device: str, what: str):
    """The folder's model through a transformers auto class, on ``device``, in eval mode."""
    model = auto_class.from_pretrained(path).to(device).eval()
    log.info("%s model %s loaded on %s", what, path, device)
    return model


def torch_device(gpu_assigned: bool, threads: int) -> str:
    """Set this process's torch threads; ``cuda`` when a GPU is assigned to it and usable, else ``cpu``."""
    import torch

    torch.set_num_threads(max(1, threads))
    return "cuda" if gpu_assigned and torch.cuda.is_available() else "cpu"
