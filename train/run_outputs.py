"""What rank 0 writes while a run goes: JSONL + TensorBoard metrics, the progress line, PNG plots, the profiler window.

`MetricLogger` does the rank-0 gating itself, so callers never check ``rank == 0``.
Files in the run folder: ``metrics.jsonl`` (one JSON object per logged step or evaluation, with
``kind`` = ``train`` or ``eval``), ``tb/`` (TensorBoard events), ``loss.png``, ``recall.png``;
their paths come from train/run_layout.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys

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
    ):
        self.enabled = rank == 0
        self.run, self.plots = run, plots
        self.path = run.metrics
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(run.root, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(run.tensorboard)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
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


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def _short(values: dict) -> str:
    keys = [k for k in values if k.endswith(("t2v_r1", "t2v_r5", "v2t_r1"))]
    return ", ".join(f"{k}={values[k]:.1f}" for k in keys)


def write_plots(run: RunLayout) -> list[str]:
    """The loss plot (every loss term vs step) and the recall plot (eval R@k vs step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run.metrics)
    written = []
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    for name, data, prefix, path in (("loss", train, "loss", run.loss_plot), ("recall", evals, "", run.recall_plot)):
        keys = sorted({k for r in data for k in r if k.startswith(prefix) and _is_curve(k, name)})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            points = [(r["step"], r[key]) for r in data if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if name == "loss" else "recall (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _is_curve(key: str, plot: str) -> bool:
    if plot == "loss":
        return key.startswith("loss")
    return "_r1" in key or "_r5" in key or "_r10" in key


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
