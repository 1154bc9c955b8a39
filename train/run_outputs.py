"""What rank 0 writes while a run goes: JSONL, TensorBoard and W&B metrics, the progress line, PNG plots, the
profiler window.

`MetricLogger` does the rank-0 gating itself, so callers never check ``rank == 0``.
Files in the run folder: ``metrics.jsonl`` (one JSON object per logged step or evaluation, with
``kind`` = ``train`` or ``eval``), ``tb/`` (TensorBoard events), ``wandb/`` (with ``log.wandb=true``: W&B's
run folders, ``offline-run-*`` under ``WANDB_MODE=offline``), ``loss.png``, ``recall.png``; their paths come
from train/run_layout.py. TensorBoard and W&B get every numeric value of a row as ``<kind>/<key>`` at the
row's step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import sys

from pipeline import config
from train.config import TrainConfig
from train.run_layout import RunLayout

logger = logging.getLogger(__name__)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricLogger:
    """Writes metrics rows (rank 0 only) and owns the progress bar."""

    def __init__(
        self,
        run: RunLayout,
        rank: int,
        total_steps: int,
        start_step: int,
        *,
        tensorboard: bool = True,
        progress_bar: bool = True,
        plots: bool = True,
        wandb: dict | None = None,
    ):
        """``wandb``: the arguments of ``wandb.init`` (`wandb_settings`), None for no W&B run."""
        self.enabled = rank == 0
        self.run, self.plots = run, plots
        self.path = run.metrics
        self._tb = None
        self._bar = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(run.root, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(run.tensorboard)
        if wandb is not None:
            self._wandb = start_wandb(run, wandb)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        scalars = {
            f"{kind}/{key}": value
            for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if kind == "eval":
            logger.info("eval @ step %d: %s", step, _short(values))

    def advance(self, step: int, values: dict) -> None:
        """Tick the progress bar with a few headline numbers."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self.plots and os.path.exists(self.path):
            write_plots(self.run)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# ----------------------------------------------------------------------------- W&B


def wandb_settings(cfg: TrainConfig) -> dict | None:
    """The ``wandb.init`` arguments of a run with ``log.wandb=true`` (None without). Call it on every rank: a
    missing wandb package is a ValueError everywhere, not on rank 0 alone. Unset names fall back to W&B's
    environment variables as W&B users expect (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_TAGS)."""
    log = cfg.log
    if not log.wandb:
        return None
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("log.wandb=true but wandb is not installed: pip install -e '.[wandb]' in the repository")
    return {
        "project": log.wandb_project or os.environ.get("WANDB_PROJECT") or "vidproxy",
        "entity": log.wandb_entity,
        "name": log.wandb_name or os.environ.get("WANDB_NAME") or os.path.basename(os.path.abspath(cfg.run_dir)),
        "tags": list(log.wandb_tags) or None,
        "config": config.to_dict(cfg),
    }


def start_wandb(run: RunLayout, settings: dict):
    """Start (or, for a resumed run folder, continue) the run's W&B run under ``<run_dir>/wandb``."""
    import wandb

    os.makedirs(run.wandb, exist_ok=True)
    if os.path.exists(run.wandb_run_id):
        with open(run.wandb_run_id) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B run ids: lower-case letters and digits
        with open(run.wandb_run_id, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(dir=run.root, id=run_id, resume="allow", **settings)


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def _short(values: dict) -> str:
    keys = [k for k in values if k.endswith(("t2v_r1", "t2v_r5", "v2t_r1"))]
    return ", ".join(f"{k}={values[k]:.1f}" for k in keys)


def write_plots(run: RunLayout) -> list[str]:
    """The loss plot (every loss term vs step) and the recall plot (eval R@k vs step); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run.metrics)
    written = []
    for path, draw in (
        (run.loss_plot, loss_figure([r for r in rows if r["kind"] == "train"])),
        (run.recall_plot, recall_figure([r for r in rows if r["kind"] == "eval"])),
    ):
        if draw is not None:
            draw.savefig(path, dpi=100)
            plt.close(draw)
            written.append(path)
    return written


def _curve(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def loss_figure(rows: list[dict]):
    """Every loss term vs step, legend outside the axes; None without loss values."""
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    for key in keys:
        steps, values = _curve(rows, key)
        ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


RECALL_STYLES = ((1, "tab:blue", "o"), (5, "tab:orange", "s"), (10, "tab:green", "^"))
"""R@k -> (colour, marker) of the recall plot; the DSL curve of R@k is dashed in the same colour."""


def recall_figure(rows: list[dict]):
    """Text->video and video->text panels, R@1/5/10 in distinct colours and markers (DSL dashed), the legend
    right of both panels; None without recall values."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not any(f"{d}_r{k}" in r for r in rows for d in ("t2v", "v2t") for k, _, _ in RECALL_STYLES):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, layout="constrained")
    for ax, direction, title in zip(axes, ("t2v", "v2t"), ("text -> video", "video -> text")):
        for k, colour, marker in RECALL_STYLES:
            steps, values = _curve(rows, f"{direction}_r{k}")
            ax.plot(steps, values, color=colour, marker=marker, label=f"R@{k}")
            steps, values = _curve(rows, f"dsl/{direction}_r{k}")
            if steps:
                ax.plot(steps, values, color=colour, linestyle="--", alpha=0.7, label=f"R@{k} DSL")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    handles = [Line2D([], [], color=c, marker=m, label=f"R@{k}") for k, c, m in RECALL_STYLES]
    handles += [
        Line2D([], [], color="black", label="zero-shot"),
        Line2D([], [], color="black", linestyle="--", alpha=0.7, label="with DSL"),
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    return fig


class StepProfiler:
    """Optional torch.profiler window over training steps (rank 0): ``log.profile_steps`` > 0.

    Skips the first ``skip`` steps and one warm-up step, records ``steps`` steps, then writes
    ``profile.txt`` (ops by device time, then by host time) and ``profile_trace.json`` (open in
    Perfetto or chrome://tracing) into the run folder.
    """

    def __init__(self, run: RunLayout, rank: int, steps: int, skip: int):
        self.profiler = None
        if rank != 0 or steps <= 0:
            return
        import torch
        import torch.profiler as tp

        self.run, self.cuda = run, torch.cuda.is_available()
        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = tp.profile(
            activities=activities,
            on_trace_ready=self._write,
            schedule=tp.schedule(skip_first=skip, wait=0, warmup=1, active=steps, repeat=1),
        )
        self.profiler.start()

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _write(self, prof) -> None:
        averages = prof.key_averages()
        device_key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        with open(self.run.profile_table, "w") as f:
            f.write(averages.table(sort_by=device_key, row_limit=40) + "\n")
            f.write(averages.table(sort_by="cpu_time_total", row_limit=40) + "\n")
        prof.export_chrome_trace(self.run.profile_trace)
        logger.info("wrote %s and %s", self.run.profile_table, self.run.profile_trace)
