"""The end-to-end demo on an embedded default data set (``make demo``).

1. generate a synthetic corpus (coloured shapes moving in a direction; HD-VILA layout,
   subtitles and captions naming colour, shape and direction), plus a held-out corpus;
2. shard both with the Ray preprocessing job on a local Ray cluster (``preprocess/shard.py``);
3. post-pretrain a tiny video-proxy CLIP from scratch with DeepSpeed on 2 CPU ranks
   (``launch/pretrain.sh``), evaluating zero-shot retrieval on the held-out shards;
4. evaluate the final checkpoint on the held-out shards again with train.evaluate, keeping a thumbnail per clip;
5. write ``report.md`` (metrics table, timings, plot paths) and ``report.html`` (the train.evaluate report page:
   metrics, recall and loss plots, timings, 12 queries with their top-5 clips as thumbnails) in the output
   folder, and print the former.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import storage  # noqa: E402
from pipeline.config import HelpFormatter  # noqa: E402
from pipeline.layout import DatasetLayout  # noqa: E402
from preprocess.synthetic import make_corpus  # noqa: E402
from train.run_layout import RunLayout  # noqa: E402

METRIC_ROWS = ["t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "v2t_r1", "v2t_r5", "v2t_r10", "v2t_medr"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--out",
        default="demo_out",
        help="output folder (its shards are reused by a rerun with the "
        "same data arguments; training always starts afresh)",
    )
    parser.add_argument("--videos", type=int, default=48, help="training source videos")
    parser.add_argument("--clips-per-video", type=int, default=4, help="clips per source video")
    parser.add_argument("--heldout-videos", type=int, default=8, help="held-out source videos (evaluation)")
    parser.add_argument("--frames", type=int, default=8, help="frames stored and used per clip")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps")
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU: gloo)")
    parser.add_argument("--config", default=str(REPO / "launch/configs/train/tiny.yaml"), help="training YAML")
    args = parser.parse_args(argv)
    for name in ("videos", "clips_per_video", "heldout_videos", "frames", "steps", "ranks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(cmd: list[str], log: Path) -> None:
    """Run a step, its output teed to a log file; a failure names the log."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")  # torch's collective deprecations
        env.setdefault("PYTHON", sys.executable)  # launch/pretrain.sh's ranks: this interpreter, venv or not
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("(", "[")) or "error" in line.lower():
                sys.stdout.write("  " + line)
        if proc.wait() != 0:
            raise SystemExit(f"demo: step failed with exit code {proc.returncode}; see {log}")


def prepare_out(out: Path, args) -> None:
    """Keep shards only from a demo run with the same data arguments; always train from step 0.

    (A stale run folder would otherwise be resumed, or refused when the tiny config has changed.)
    """
    stamp = out / "demo-data.json"
    wanted = {name: getattr(args, name) for name in ("videos", "clips_per_video", "heldout_videos", "frames")}
    if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        shutil.rmtree(out / "shards", ignore_errors=True)
    shutil.rmtree(out / "run", ignore_errors=True)
    stamp.write_text(json.dumps(wanted))


def shard(corpus, output: Path, frames: int, log: Path) -> None:
    if storage.exists(DatasetLayout(str(output)).manifest):
        print(f"shards already committed in {output}")
        return
    run(
        [
            sys.executable,
            "preprocess/shard.py",
            "--metadata",
            str(corpus.metadata),
            "--videos",
            str(corpus.videos),
            "--subtitles",
            str(corpus.subtitles),
            "--captions",
            str(corpus.captions),
            "--output",
            str(output),
            "--num-frames",
            str(frames),
            "--short-side",
            "48",
            "--clips-per-shard",
            "32",
            "--ray-address",
            "local",
            "--num-cpus",
            "2",
            "--no-progress",
        ],
        log,
    )


def train(args, train_shards: Path, eval_shards: Path, run_dir: Path, log: Path) -> None:
    run(
        [
            "bash",
            "launch/pretrain.sh",
            "--gpus",
            str(args.ranks),
            "--",
            "--config",
            args.config,
            f"data.train=[{train_shards}]",
            f"data.eval=[{eval_shards}]",
            f"run_dir={run_dir}",
            f"max_steps={args.steps}",
            f"data.num_frames={args.frames}",
            f"log.eval_every_steps={max(args.steps // 4, 1)}",
            f"checkpoint.every_steps={args.steps}",
        ],
        log,
    )


def final_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in open(RunLayout(str(run_dir)).metrics)]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not evals:
        raise SystemExit(f"demo: no evaluation in {RunLayout(str(run_dir)).metrics}")
    return evals[-1]


def write_report(out: Path, result: dict, timings: dict, run_dir: Path) -> str:
    clips = int(result.get("clips", 0))
    chance = 100.0 / clips if clips else float("nan")
    lines = [
        "# vidproxy demo report",
        "",
        f"Zero-shot retrieval on {clips} held-out synthetic clips (query: caption; chance R@1 = {chance:.1f}%),",
        f"after step {result.get('step')}.",
        "",
        "| metric | plain | DSL (uses the whole query set) |",
        "|---|---|---|",
    ]
    for key in METRIC_ROWS:
        plain, dsl = result.get(key), result.get(f"dsl/{key}")
        lines.append(f"| {key} | {_fmt(plain)} | {_fmt(dsl)} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {secs:.1f} |" for name, secs in timings.items()]
    run = RunLayout(str(run_dir))
    lines += [
        "",
        f"Page with plots and retrieved clips: {out / 'report.html'}",
        f"Plots: {run.loss_plot}, {run.recall_plot}",
        f"Metrics: {run.metrics} (TensorBoard: {run.tensorboard})",
        "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def embed_heldout(run_dir: Path, heldout: Path):
    """The final checkpoint's embedding of the clips the in-training evaluation used (its query text, its first
    data.eval_max_samples clips), one thumbnail per clip; and the name of that text."""
    from train.checkpoint import load_model, train_config
    from train.evaluate import embed_dataset

    data = train_config(RunLayout(str(run_dir)).config).data
    loaded = load_model(str(run_dir), device="cpu")
    embedded = embed_dataset(
        loaded, str(heldout), data.eval_text, progress=False, max_videos=data.eval_max_samples, thumbnails=True
    )
    return embedded, data.eval_text


def write_html_report(out: Path, embedded, text: str, heldout: Path, timings: dict, run_dir: Path) -> Path:
    """report.html: train.evaluate's page of the final checkpoint plus the loss plot and the timing table."""
    from train.eval_report import plot_section
    from train.evaluate import evaluate, report_body, write_report
    from train.html_page import table

    results = {**evaluate(embedded), "data": str(heldout), "text": text}
    run = RunLayout(str(run_dir))
    timing = table(["stage", "seconds"], [[name, f"{secs:.1f}"] for name, secs in timings.items()])
    extra = (
        plot_section("Loss during training", run.loss_plot, f"No loss plot: {run.loss_plot} is missing."),
        f"<h2>Timings</h2>\n{timing}",
    )
    path = out / "report.html"
    write_report(str(path), "vidproxy demo report", report_body(results, embedded, str(run_dir), extra=extra))
    return path


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare_out(out, args)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    timings = {}
    start = time.perf_counter()
    train_corpus = make_corpus(out / "corpus/train", videos=args.videos, clips_per_video=args.clips_per_video, seed=0)
    held_corpus = make_corpus(
        out / "corpus/heldout", videos=args.heldout_videos, clips_per_video=args.clips_per_video, seed=1
    )
    timings["generate corpus"] = time.perf_counter() - start
    for name, corpus in (("train", train_corpus), ("heldout", held_corpus)):
        t = time.perf_counter()
        shard(corpus, out / "shards" / name, args.frames, out / f"shard-{name}.log")
        timings[f"shard {name} (Ray)"] = time.perf_counter() - t
    t = time.perf_counter()
    run_dir = out / "run"
    train(args, out / "shards/train", out / "shards/heldout", run_dir, out / "train.log")
    timings["train + eval (DeepSpeed)"] = time.perf_counter() - t
    t = time.perf_counter()
    embedded, text = embed_heldout(run_dir, out / "shards/heldout")
    timings["final eval + thumbnails"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    write_html_report(out, embedded, text, out / "shards/heldout", timings, run_dir)
    print()
    print(write_report(out, final_eval(run_dir), timings, run_dir))


if __name__ == "__main__":
    main()
