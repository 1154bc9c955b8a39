"""launch.search over a long video as windows, and what a hit shows (text, --json, --html) for files and shards.

The long video is a real mp4 written by ffmpeg: 8 segments of 15 s, each one flat colour (2 minutes, 64x48,
4 fps). A random model does not rank by colour, so the tiny model is first trained (plain torch, InfoNCE, as
test_search.py does) to pair flat frames of the 8 colours, made in numpy, with captions "a <colour> screen";
it never sees the video. Then a caption query must return, first, the window that covers its segment.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from launch.search import WindowConfig, window_spans
from launch.search import main as search_main
from tests.downstream.test_evaluate import synthetic_samples, write_samples, write_tiny_config
from tests.downstream.test_search import train_tiny
from tests.support.browser import render, require_chromium
from train.search_hits import clock
from train.search_index import read_index, strip_picks

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SEGMENT = 15.0
WINDOW, STRIDE = 15.0, 5.0


def write_coloured_video(path) -> str:
    """8 segments of SEGMENT seconds, one colour each, concatenated by ffmpeg into one H.264 mp4."""
    inputs = []
    for name in COLOURS:
        inputs += ["-f", "lavfi", "-i", f"color=c={name}:s=64x48:r=4:d={SEGMENT}"]
    joined = "".join(f"[{i}:v]" for i in range(len(COLOURS))) + f"concat=n={len(COLOURS)}:v=1:a=0[v]"
    cmd = ["ffmpeg", "-loglevel", "error", "-y", *inputs, "-filter_complex", joined, "-map", "[v]"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "8", str(path)]
    subprocess.run(cmd, check=True, timeout=120)
    return str(path)


def caption(colour: str) -> str:
    return f"a {colour} screen"


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """The 2-minute video in its own folder, a tiny model trained on flat colours, and the video's index (15 s
    windows every 5 s)."""
    root = tmp_path_factory.mktemp("windows")
    (root / "videos").mkdir()
    video = write_coloured_video(root / "videos" / "colours.mp4")
    config = write_tiny_config(root / "tiny.yaml")
    rng = np.random.default_rng(0)
    flat = np.stack(
        [np.broadcast_to(np.array(rgb, np.uint8)[None, :, None, None], (4, 3, 32, 32)) for rgb in COLOURS.values()]
    )
    noisy = np.clip(flat.astype(np.int16) + rng.integers(-12, 13, flat.shape), 0, 255).astype(np.uint8)
    model = train_tiny(config, noisy, [caption(c) for c in COLOURS])
    import torch

    weights = root / "model.pt"
    torch.save(model.state_dict(), weights)
    common = ["--checkpoint", str(weights), "--config", config, "--device", "cpu"]
    index = str(root / "windows.parquet")
    embed = ["embed", *common, "--videos", str(root / "videos"), "--out", index, "--no-progress"]
    embed += ["--window", str(WINDOW), "--stride", str(STRIDE)]
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert search_main(embed) == 0
    return {"root": root, "video": video, "common": common, "index": index, "embed_out": said.getvalue()}


def run(capsys, *argv: str) -> str:
    code = search_main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_window_spans_cover_the_file():
    cfg = WindowConfig(window=15.0, stride=7.5)
    assert window_spans(10.0, cfg) == [(0.0, None)]  # shorter than a window: one row spanning the file
    assert window_spans(600.0, cfg)[-2:] == [(577.5, 592.5), (585.0, None)]  # 10 minutes: 79 windows
    assert len(window_spans(600.0, cfg)) == 79
    assert window_spans(31.0, cfg) == [(0.0, 15.0), (7.5, 22.5), (15.0, None)]  # 1 s left: the last stretched
    assert window_spans(35.0, cfg) == [(0.0, 15.0), (7.5, 22.5), (15.0, 30.0), (20.0, None)]  # 5 s: one more
    with pytest.raises(ValueError, match="--stride must be in"):
        WindowConfig(window=10.0, stride=12.0)
    assert strip_picks(12, 3) == [2, 6, 10] and strip_picks(8, 3)[1] == 4 and strip_picks(2, 3) == [0, 1]


def test_caption_query_finds_its_segments_window_first(long_video, capsys):
    v = long_video
    assert "22 videos, 0 texts, 32 dims" in v["embed_out"]
    table = read_index(v["index"])
    starts = table.rows.column("start").to_pylist()
    ends = table.rows.column("end").to_pylist()
    assert starts == [5.0 * k for k in range(22)]  # 0, 5, ..., 100, then the last window ends at the file's end
    assert ends[:-1] == [5.0 * k + WINDOW for k in range(21)] and ends[-1] == pytest.approx(120.0, abs=0.3)
    assert table.rows.column("id").to_pylist()[3] == "colours.mp4@00:00:15.000"
    assert set(table.rows.column("source").to_pylist()) == {v["video"]}
    found = []
    for k, colour in enumerate(COLOURS):
        hits = json.loads(
            run(capsys, "query", *v["common"], "--index", v["index"], "--text", caption(colour), "--json")
        )
        found.append((colour, hits[0]["span"], f"{clock(k * SEGMENT)}-{clock((k + 1) * SEGMENT)}"))
        assert abs(hits[0]["start"] - k * SEGMENT) <= STRIDE, found[-1]
        assert hits[0]["source"] == v["video"] and len(hits[0]["thumbnails"]) == 3
    print("query: first hit's span, expected span:", *found, sep="\n  ")
    exact = sum(first == expected for _, first, expected in found)
    print(f"{exact}/8 exactly the segment's window, 8/8 within one stride ({STRIDE} s)")


def test_hits_as_text_and_html_page(long_video, capsys):
    v = long_video
    text = run(capsys, "query", *v["common"], "--index", v["index"], "--text", caption("blue"), "-k", "2")
    first = text.splitlines()[0]
    assert first.split()[0] == "1" and "colours.mp4@" in first and f"source: {v['video']}" in text
    page = str(v["root"] / "hits.html")
    out = run(
        capsys, "query", *v["common"], "--index", v["index"], "--text", caption("blue"), "-k", "3", "--html", page
    )
    assert out.startswith(f"wrote {page}: 3 hits")
    hits = json.loads(
        run(capsys, "query", *v["common"], "--index", v["index"], "--text", caption("blue"), "-k", "3", "--json")
    )
    check_page(page, hits, frames_per_hit=3)
    with open(page, encoding="utf-8") as f:
        html = f.read()
    assert all(uri in html for uri in hits[0]["thumbnails"])  # the JSON's images are the page's
    require_chromium()
    shown = render(page, str(v["root"] / "hits.png"))  # the screenshot stays next to the page
    print(f"search page rendered: {shown.screenshot}")
    assert shown.images == 3 * len(hits) and shown.broken == []
    assert hits[0]["span"] in shown.text and caption("blue") in shown.text


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def check_page(page: str, hits: list[dict], frames_per_hit: int) -> None:
    """Every image inline as a JPEG, one strip per hit, the first hit's span and source on the page."""
    with open(page, encoding="utf-8") as f:
        html = f.read()
    parser = Images()
    parser.feed(html)
    assert len(parser.sources) == frames_per_hit * len(hits)
    for src in parser.sources:
        head, _, data = src.partition(",")
        assert head == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "JPEG" and image.width > 0
    assert hits[0]["span"] in html and hits[0]["source"] in html
    assert 'src="http' not in html and "<link" not in html and "<script" not in html  # nothing fetched


def test_shard_hits_keep_clip_id_span_source_and_texts(long_video, tmp_path, capsys):
    import dataclasses

    from pipeline.schema import ClipSample

    samples = []
    for i, (s, cap) in enumerate(synthetic_samples(4, seed=3)):
        meta = dataclasses.replace(
            s.meta, span=(60.0 + 10 * i, 64.5 + 10 * i), source_uri=f"https://example.com/v{i}.mp4"
        )
        samples.append(ClipSample(meta=meta, frames=s.frames, subtitle=f"spoken words {i}", caption=cap))
    data = write_samples(tmp_path / "shards", samples)
    index = str(tmp_path / "shards.parquet")
    assert "4 videos, 4 texts" in run(
        capsys, "embed", *long_video["common"], "--data", data, "--out", index, "--no-progress"
    )
    base = ["query", *long_video["common"], "--index", index, "-k", "4"]
    query = [*base, "--text", samples[2].caption, "--json"]
    hits = json.loads(run(capsys, *query))
    assert set(hits[0]) == {
        "rank",
        "score",
        "kind",
        "id",
        "video",
        "source",
        "start",
        "end",
        "span",
        "text",
        "caption",
        "subtitle",
        "row",
        "thumbnails",
    }
    by_id = {h["id"]: h for h in hits}
    assert len(by_id) == 4
    for i, s in enumerate(samples):
        h = by_id[s.meta.clip_id]
        assert (h["kind"], h["video"], h["source"]) == ("video", s.meta.clip_id, f"https://example.com/v{i}.mp4")
        assert (h["start"], h["end"], h["span"]) == (
            60.0 + 10 * i,
            64.5 + 10 * i,
            f"{clock(60 + 10 * i)}-{clock(64.5 + 10 * i)}",
        )
        assert (h["caption"], h["subtitle"], h["text"], len(h["thumbnails"])) == (s.caption, f"spoken words {i}", "", 3)
    texts = json.loads(run(capsys, *base, "--video", long_video["video"], "--target", "text", "--json"))
    for h in texts:
        i = int(h["source"][-5])
        assert (h["kind"], h["id"], h["text"], h["start"]) == (
            "text",
            f"{samples[i].meta.clip_id}#0",
            f"spoken words {i}",
            60.0 + 10 * i,
        )
        assert len(h["thumbnails"]) == 3  # its clip's strip
    page = str(tmp_path / "texts.html")
    run(capsys, *base, "--video", long_video["video"], "--target", "text", "--html", page)
    check_page(page, texts, frames_per_hit=3)


def test_ivf_side_file_end_to_end(long_video, tmp_path, capsys):
    """--ann-above 0 writes the window rows' IVF index beside the table; a query searches it and returns the
    exact search's hits (22 rows make one IVF list, which every query scans); --exact and the default agree."""
    v = long_video
    index = str(tmp_path / "ann.parquet")
    embed = ["embed", *v["common"], "--videos", str(v["root"] / "videos"), "--out", index, "--no-progress"]
    said = run(capsys, *embed, "--window", str(WINDOW), "--stride", str(STRIDE), "--ann-above", "0")
    assert f"wrote {index}.video.faiss: approximate index (FAISS IVF, 1 cells)" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.parquet", "ann.parquet.video.faiss"]
    query = ["query", *v["common"], "--index", index, "--text", caption("cyan"), "-k", "22", "--json"]
    by_ivf, by_numpy = (json.loads(run(capsys, *query, *more)) for more in ((), ("--exact",)))
    assert [h["id"] for h in by_ivf] == [h["id"] for h in by_numpy]
    assert [h["score"] for h in by_ivf] == pytest.approx([h["score"] for h in by_numpy], abs=1e-5)
    assert abs(by_ivf[0]["start"] - 4 * SEGMENT) <= STRIDE  # cyan is the fifth segment
