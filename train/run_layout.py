"""Where a training run keeps its files: the one place that builds paths inside a run folder.

    <run_dir>/
      config.yaml          the resolved TrainConfig (train/main.py; compared on resume by train/config.py)
      ds_config.json       the DeepSpeed JSON (train/engine.py)
      metrics.jsonl        one JSON row per logged step or evaluation (train/run_outputs.py)
      tb/                  TensorBoard events
      loss.png recall.png  plots of metrics.jsonl, written at the end
      profile.txt          the optional torch.profiler window: op tables ...
      profile_trace.json   ... and the trace (Perfetto, chrome://tracing)
      wandb/               W&B's own run folders (log.wandb=true) and run_id, the W&B run a resume continues
      checkpoints/         DeepSpeed checkpoints (`CheckpointFolder`):
        latest             the name (tag) of the newest one
        step000000100/     one folder per save; mp_rank_00_model_states.pt holds the model weights (ZeRO-1/2;
                           ZeRO-3 spreads them over the ranks' files: train/checkpoint.py consolidates)

A checkpoints folder is also read on its own (train/checkpoint.py takes a run folder, a
checkpoints folder or one tag folder), hence its own class.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

TAG_PREFIX = "step"
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the model weights inside a tag folder (one model-parallel rank)."""


@dataclass(frozen=True)
class CheckpointFolder:
    """A DeepSpeed checkpoints folder: one tag folder per save and ``latest`` naming the newest."""

    path: str

    @property
    def latest(self) -> str:
        return os.path.join(self.path, "latest")

    def latest_tag(self) -> str | None:
        """The tag named in ``latest``, or None when there is no checkpoint."""
        if not os.path.exists(self.latest):
            return None
        with open(self.latest) as f:
            return f.read().strip()

    @staticmethod
    def tag(step: int) -> str:
        return f"{TAG_PREFIX}{step:09d}"

    def tags(self) -> list[str]:
        """The tags of the saved steps, oldest first."""
        if not os.path.isdir(self.path):
            return []
        return sorted(
            d for d in os.listdir(self.path) if d.startswith(TAG_PREFIX) and os.path.isdir(os.path.join(self.path, d))
        )

    def tag_dir(self, tag: str) -> str:
        return os.path.join(self.path, tag)

    @property
    def universal_root(self) -> str:
        """Where checkpoints converted to DeepSpeed's universal format go (a resume at another world size)."""
        return os.path.join(self.path, "universal")

    def model_states(self, tag: str) -> str:
        return model_states_in(self.tag_dir(tag))

    def optimizer_state_files(self, tag: str) -> list[str]:
        """ZeRO's optimizer-state files of a tag: one per data-parallel rank that saved it."""
        return glob.glob(os.path.join(self.tag_dir(tag), "*zero_pp_rank_*_optim_states.pt"))


def model_states_in(tag_dir: str) -> str:
    """The model-weights file inside one tag folder."""
    return os.path.join(tag_dir, MODEL_STATES)


def zero3_model_states(rank: int | str) -> str:
    """DeepSpeed's per-rank model states file of a ZeRO-3 tag folder (its weights are in the optimizer files)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def zero3_optim_states(rank: int | str) -> str:
    """A rank's optimizer states file: its partition of the fp32 weights, Adam moments."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder (see the module docstring)."""

    root: str

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.yaml")

    @property
    def ds_config(self) -> str:
        return os.path.join(self.root, "ds_config.json")

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.root, "tb")

    @property
    def loss_plot(self) -> str:
        return os.path.join(self.root, "loss.png")

    @property
    def recall_plot(self) -> str:
        return os.path.join(self.root, "recall.png")

    @property
    def profile_table(self) -> str:
        return os.path.join(self.root, "profile.txt")

    @property
    def profile_trace(self) -> str:
        return os.path.join(self.root, "profile_trace.json")

    @property
    def wandb(self) -> str:
        """The folder W&B writes into (``wandb.init(dir=root)`` makes ``<root>/wandb``)."""
        return os.path.join(self.root, "wandb")

    @property
    def wandb_run_id(self) -> str:
        return os.path.join(self.wandb, "run_id")

    @property
    def checkpoints(self) -> CheckpointFolder:
        return CheckpointFolder(os.path.join(self.root, "checkpoints"))
