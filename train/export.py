"""Export a trained model: safetensors of the whole model, the CLIP-ViP layout, or open_clip's CLIP.

    python -m train.export RUN --format safetensors --out model.safetensors
    python -m train.export RUN --format clipvip --out clipvip.pt
    python -m train.export RUN --format open_clip --out exported/vidproxy-b32.safetensors

CHECKPOINT is anything train.evaluate takes: a run folder (any ZeRO stage), its checkpoints folder,
one tag folder, or a weights file with ``--config`` (train/checkpoint.py). The model is loaded
strictly into the configured architecture first (a ``--config`` whose model differs from the one the
checkpoint records is refused; ``auto`` fields adopt it), so what is written always fits it. Every
format carries the model record (train/model_record.py: open_clip name, activation, proxies, slots) in
its safetensors metadata, or for other suffixes in ``OUT.model.json`` beside it.

Formats (docs/training.md, "Checkpoints and export"):

- ``safetensors``: our VideoCLIP state dict, names as in train/model.py; train.evaluate, train.search
  and ``model.init_checkpoint`` read it back (with the run's config.yaml as ``--config``).
- ``clipvip``: the layout of the released CLIP-ViP checkpoints (train/weights.py): HF ``CLIPModel``
  names under ``clipmodel.`` plus ``added_cls`` (the proxy tokens) and ``temporal_embedding``;
  .safetensors, or torch.save for any other suffix.
- ``open_clip``: the CLIP towers as an open_clip CLIP state dict (without the proxy tokens and the
  temporal embedding: the image tower is CLIP's own) and its model config as ``OUT`` with the suffix
  ``.json``, so that ``open_clip.add_model_config(json); open_clip.create_model(NAME, pretrained=OUT)``
  loads it, NAME being the JSON file's stem. A model of one of open_clip's own configs (no
  ``clip_overrides``) also loads as ``open_clip.create_model(clip_model, pretrained=OUT)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import open_clip

from pipeline.config import HelpFormatter, prog
from pipeline.logs import setup_logging
from train.checkpoint import load_model
from train.model import VideoCLIP, clip_model_config
from train.model_record import model_record
from train.weights import RECORD_SIDECAR, ours_to_open_clip, save_clipvip_checkpoint, save_state_dict

logger = logging.getLogger(__name__)


def export_safetensors(model: VideoCLIP, out: str) -> list[str]:
    """The whole model's state dict as one .safetensors file."""
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"--out {out}: the safetensors format writes a .safetensors file")
    save_state_dict(model.state_dict(), out, model_record(model.cfg))
    return [out]


def export_clipvip(model: VideoCLIP, out: str) -> list[str]:
    """The CLIP-ViP layout (train/weights.py), .safetensors or torch.save by the suffix."""
    save_clipvip_checkpoint(model, out, model_record(model.cfg))
    return [out] if Path(out).suffix == ".safetensors" else [out, f"{out}{RECORD_SIDECAR}"]


def export_open_clip(model: VideoCLIP, out: str) -> list[str]:
    """open_clip's CLIP state dict at ``out`` and its model config beside it (``out`` with the suffix .json)."""
    config_path = str(Path(out).with_suffix(".json"))
    name = Path(config_path).stem
    model_cfg = clip_model_config(model.cfg)
    builtin = open_clip.get_model_config(name)
    if builtin is not None and builtin != model_cfg:
        raise ValueError(
            f"--out {out}: {name!r} is one of open_clip's own model names with another config; "
            "registering this model's config under it would replace open_clip's (choose another file name)"
        )
    save_state_dict(ours_to_open_clip(model.state_dict()), out, model_record(model.cfg))
    with open(config_path, "w") as f:
        json.dump(model_cfg, f, indent=1, sort_keys=True)
    return [out, config_path] + ([] if Path(out).suffix == ".safetensors" else [f"{out}{RECORD_SIDECAR}"])


EXPORTERS: dict[str, Callable[[VideoCLIP, str], list[str]]] = {
    "safetensors": export_safetensors,
    "clipvip": export_clipvip,
    "open_clip": export_open_clip,
}


def how_to_load(model: VideoCLIP, fmt: str, written: list[str]) -> str:
    """One line per way to read the export back."""
    out = written[0]
    if fmt == "open_clip":
        name = Path(written[1]).stem
        lines = [f"open_clip.add_model_config({written[1]!r}); open_clip.create_model({name!r}, pretrained={out!r})"]
        if clip_model_config(model.cfg) == open_clip.get_model_config(model.cfg.clip_model):
            lines.append(f"open_clip.create_model({model.cfg.clip_model!r}, pretrained={out!r})")
        return "\n".join(f"  {line}" for line in lines)
    if fmt == "clipvip":
        return f"  model.init_checkpoint={out} (strip 'clipmodel.' for transformers.CLIPModel, non-strict)"
    return f"  python -m train.evaluate --checkpoint {out} --config <the run's config.yaml> --data ..."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("python -m train.export"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("checkpoint", help="run folder, checkpoints folder, tag folder or weights file")
    p.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="what to write (see the module doc)")
    p.add_argument("--out", required=True, help="file to write (.safetensors, or torch.save for .pt/.bin)")
    p.add_argument("--config", help="training YAML giving the model shape (default: the run's config.yaml)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    try:
        loaded = load_model(args.checkpoint, args.config, device="cpu")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        written = EXPORTERS[args.format](loaded.model, args.out)
    except (ValueError, OSError) as exc:
        print(f"train.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(written)} ({args.format}) from {loaded.checkpoint}; load it with")
    print(how_to_load(loaded.model, args.format, written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
