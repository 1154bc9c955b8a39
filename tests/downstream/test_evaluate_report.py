"""train.evaluate --html: the report page of a tiny random model on real shards, opened in headless Chromium as a
person would (tests/support/browser.py): every image loads, the counts and texts are the expected ones. The
page and its screenshot stay next to each other in the test's run folder (the path is printed)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.schema import ClipSample
from tests.downstream.test_evaluate import save_random_model, synthetic_samples, write_samples, write_tiny_config
from tests.support.browser import render, require_chromium
from train.checkpoint import load_model
from train.eval_report import clip_thumbnail, pick_queries, run_folder
from train.evaluate import embed_dataset
from train.evaluate import main as evaluate_main
from train.html_page import img, write_page
from train.run_layout import RunLayout
from train.run_outputs import MetricLogger

VIDEOS = 8


@pytest.fixture
def captioned_set(tmp_path) -> str:
    """8 clips over 2 shards, each with its synthetic caption ("a red circle moving left") as its one query."""
    samples = [
        ClipSample(meta=s.meta, frames=s.frames, subtitle=caption, caption=caption)
        for s, caption in synthetic_samples(VIDEOS, seed=2)
    ]
    return write_samples(tmp_path / "test", samples)


def training_run(root, steps: int = 2) -> str:
    """A run folder as training leaves it: config.yaml, a DeepSpeed checkpoint, metrics.jsonl with evaluations and
    the plots MetricLogger draws when it closes."""
    tag = root / "checkpoints" / "step000000002"
    tag.mkdir(parents=True)
    config = write_tiny_config(root / "config.yaml")
    state = torch.load(save_random_model(config, root / "m.pt", seed=3), weights_only=True)
    (root / "m.pt").unlink()
    torch.save({"module": {f"model.{k}": v for k, v in state.items()}}, tag / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text("step000000002")
    metrics = MetricLogger(RunLayout(str(root)), 0, steps, 0, tensorboard=False, progress_bar=False)
    for step in range(1, steps + 1):
        metrics.log("train", step, {"loss": 2.0 / step})
        metrics.log("eval", step, {"t2v_r1": 10.0 * step, "t2v_r5": 40.0, "v2t_r1": 12.5, "dsl/t2v_r1": 11.0 * step})
    metrics.close()
    return str(root)


def expected_ranks(checkpoint: str, config: str | None, data: str) -> tuple[list[str], np.ndarray]:
    """Each caption's rank of its own clip, counted here from the embeddings (1 + clips scored higher)."""
    embedded = embed_dataset(load_model(checkpoint, config, "cpu"), data, "caption", progress=False)
    sim = (embedded.text_embeddings @ embedded.videos.T).numpy()
    own = sim[np.arange(len(sim)), embedded.text_to_video]
    return embedded.texts, 1 + (sim > own[:, None]).sum(axis=1)


def render_report(run_dir, argv: list[str]):
    report, shot = run_dir / "report.html", run_dir / "report.png"
    assert evaluate_main([*argv, "--text", "caption", "--no-progress", "--device", "cpu", "--html", str(report)]) == 0
    rendered = render(str(report), str(shot))
    print(f"report: {report}\nscreenshot: {shot}")
    return rendered


def check_queries(rendered, texts: list[str], ranks: np.ndarray, plots: int) -> None:
    """Every image loaded; one 5-clip row per query (+1 for a correct clip below the top 5), one mark each."""
    assert rendered.broken == []
    shown = re.findall(r"at rank (\d+) of (\d+)", rendered.text)
    assert [int(r) for r, _ in shown] == sorted(ranks.tolist(), key=lambda r: (r == 1, -r))
    assert {int(n) for _, n in shown} == {VIDEOS}
    assert rendered.images == plots + sum(5 + (r > 5) for r in ranks)
    assert rendered.text.count("✓ correct") == len(texts)
    worst = min(range(len(texts)), key=lambda t: (ranks[t] == 1, -ranks[t], t))
    lines = [line.strip() for line in rendered.text.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if re.match(r"correct clip .* at rank \d+ of", line))
    assert lines[first - 1] == texts[worst], lines[first - 3 : first + 1]


@pytest.mark.slow  # two Chromium starts and two tiny-model evaluations: ~10 s on 2 cores
def test_report_of_a_training_run_in_a_browser(tmp_path, captioned_set):
    require_chromium()
    run_dir = tmp_path / "run"
    run = training_run(run_dir)
    rendered = render_report(run_dir, ["--checkpoint", run, "--data", captioned_set])
    texts, ranks = expected_ranks(run, None, captioned_set)
    check_queries(rendered, texts, ranks, plots=1)
    assert "Recall during training" in rendered.text and "No recall plot" not in rendered.text
    for heading in ("text → video", "video → text (DSL)", "R@10", "MnR"):
        assert heading in rendered.text
    assert (run_dir / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_report_of_a_bare_checkpoint_says_there_is_no_run_history(tmp_path, captioned_set):
    require_chromium()
    config = write_tiny_config(tmp_path / "tiny.yaml")
    weights = save_random_model(config, tmp_path / "model.pt")
    rendered = render_report(tmp_path, ["--checkpoint", weights, "--config", config, "--data", captioned_set])
    texts, ranks = expected_ranks(weights, config, captioned_set)
    check_queries(rendered, texts, ranks, plots=0)
    assert f"No recall plot: {weights} is a bare checkpoint" in rendered.text


@pytest.mark.slow
def test_demo_report_page_in_a_browser(tmp_path, captioned_set):
    """launch/demo.py's report.html on a finished run folder: the evaluate page plus the loss plot and timings."""
    from launch.demo import embed_heldout, write_html_report

    require_chromium()
    run_dir = tmp_path / "run"
    run = training_run(run_dir)
    embedded, text = embed_heldout(run_dir, captioned_set)
    timings = {"generate corpus": 1.25, "train + eval (DeepSpeed)": 61.0, "total": 70.5}
    page = write_html_report(tmp_path, embedded, text, captioned_set, timings, run_dir)
    rendered = render(str(page), str(tmp_path / "report.png"))
    print(f"report: {page}\nscreenshot: {tmp_path / 'report.png'}")
    texts, ranks = expected_ranks(run, None, captioned_set)
    check_queries(rendered, texts, ranks, plots=2)
    assert text == "caption" and "queries: the caption" in rendered.text
    for line in ("Loss during training", "Recall during training", "generate corpus\t1.2", "total\t70.5"):
        assert line in rendered.text


def test_html_into_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "report.html"
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", "none.pt", "--data", str(tmp_path), "--html", str(missing)])
    assert exit_info.value.code == 2
    assert f"--html {missing}: its folder does not exist" in capsys.readouterr().err


def test_browser_reports_a_broken_image(tmp_path):
    """The check can fail: a data: URI that is no image is reported broken, by its alt text."""
    require_chromium()
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good, format="PNG")
    body = img(good.getvalue(), "red box", mime="image/png") + img(b"not a jpeg", "bad frame") + "<p>after</p>"
    rendered = render(write_page(str(tmp_path / "page.html"), "Broken", body), str(tmp_path / "page.png"))
    assert (rendered.images, rendered.broken) == (2, ["bad frame"])
    assert rendered.text.split() == ["Broken", "after"]


def test_queries_failures_worst_first_then_successes():
    similarity_TV = np.array(
        [
            [0.9, 0.1, 0.2],  # text 0 -> clip 0: rank 1
            [0.9, 0.5, 0.7],  # text 1 -> clip 1: rank 3
            [0.1, 0.8, 0.7],  # text 2 -> clip 2: rank 2
            [0.0, 0.1, 0.9],  # text 3 -> clip 2: rank 1
        ]
    )
    picked = pick_queries(similarity_TV, [0, 1, 2, 2], ["t0", "t1", "t2", "t3"], count=3, top_k=2)
    assert [(q.text, q.rank, q.correct) for q in picked] == [("t1", 3, 1), ("t2", 2, 2), ("t0", 1, 0)]
    assert picked[0].top == [(0, 0.9), (2, 0.7)]


def test_thumbnail_is_three_frames_side_by_side():
    frames = []
    for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0)):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), colour).save(buf, format="JPEG")
        frames.append(buf.getvalue())
    with Image.open(io.BytesIO(clip_thumbnail(frames, count=3, height=24))) as thumb:
        assert thumb.size == (3 * 32 + 2 * 2, 24)
        picks = [thumb.getpixel((x, 12)) for x in (16, 50, 84)]  # frames 0, 2 and 4
    for got, want in zip(picks, ((255, 0, 0), (0, 0, 255), (0, 0, 0))):
        assert max(abs(a - b) for a, b in zip(got, want)) < 40, picks


def test_run_folder_of_each_checkpoint_form(tmp_path):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step000000002"
    tag.mkdir(parents=True)
    weights = tag / "mp_rank_00_model_states.pt"
    weights.write_bytes(b"")
    for form in (run, run / "checkpoints", tag, weights):
        assert run_folder(str(form)) == str(run)
    (tmp_path / "model.pt").write_bytes(b"")
    assert run_folder(str(tmp_path / "model.pt")) is None
