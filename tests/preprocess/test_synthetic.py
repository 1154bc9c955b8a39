"""The synthetic corpus: deterministic, HD-VILA layout, texts naming what the video shows, videos that decode."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips
from preprocess.synthetic import COLOURS, CorpusConfig, clip_specs, main, make_corpus


def _digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(
        tmp_path_factory.mktemp("corpus"), videos=3, clips_per_video=2, seed=7, clip_seconds=2.0, precut=True
    )


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    again = make_corpus(tmp_path / "again", videos=3, clips_per_video=2, seed=7, clip_seconds=2.0, precut=True)
    assert _digest(corpus.root) == _digest(again.root)
    first, other = (clip_specs(CorpusConfig(videos=3, clips_per_video=2, seed=s)) for s in (7, 8))
    assert [c.clip_id for c in first] != [c.clip_id for c in other]


def test_metadata_subtitles_captions_layout(corpus):
    rows = [json.loads(line) for line in corpus.metadata.read_text().splitlines()]
    assert len(rows) == 3
    clip_ids = []
    for row in rows:
        assert set(row) == {"video_id", "url", "clip"} and (corpus.videos / f"{row['video_id']}.mp4").is_file()
        for k, clip in enumerate(row["clip"]):
            assert clip["clip_id"] == f"{row['video_id']}.{k}.mp4"
            start, end = (_seconds(s) for s in clip["span"])
            assert (start, end) == (2.0 * k, 2.0 * k + 2.0)
            assert (corpus.clips / row["video_id"] / clip["clip_id"]).is_file()
            clip_ids.append(clip["clip_id"])
    subs = [json.loads(line) for line in corpus.subtitles.read_text().splitlines()]
    caps = [json.loads(line) for line in corpus.captions.read_text().splitlines()]
    assert [s["clip_id"] for s in subs] == clip_ids == [c["clip_id"] for c in caps]
    specs = clip_specs(CorpusConfig(videos=3, clips_per_video=2, seed=7, clip_seconds=2.0))
    for spec, sub, cap in zip(specs, subs, caps):
        for word in (spec.colour, spec.shape, spec.direction):
            assert word in sub["text"] and word in cap["caption"]


def test_videos_show_the_shape_colour_moving_the_right_way(corpus):
    specs = clip_specs(CorpusConfig(videos=3, clips_per_video=2, seed=7, clip_seconds=2.0))
    cfg = DecodeConfig(num_frames=2, short_side=0, jpeg_quality=95)
    for spec in specs:
        k = spec.index
        [clip] = decode_clips(
            str(corpus.videos / f"{spec.video_id}.mp4"),
            [ClipRequest(clip_id=spec.clip_id, start=2.0 * k, end=2.0 * k + 2.0)],
            cfg,
        )
        assert isinstance(clip, DecodedClip) and clip.frame_size == (160, 120)
        centres = [_centroid(jpeg, COLOURS[spec.colour]) for jpeg in clip.frames]
        dx, dy = centres[1][0] - centres[0][0], centres[1][1] - centres[0][1]
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[spec.direction]
        assert moved > 20, (spec, centres)


def _centroid(jpeg: bytes, colour) -> tuple[float, float]:
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    mask = np.abs(rgb - np.array(colour)).sum(axis=2) < 60
    assert mask.sum() > 30, "the shape's colour is not in the frame"
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--size", "7x7"])
    assert "size must be even" in capsys.readouterr().err


def test_precut_clips_decode_to_their_own_length(corpus):
    spec = clip_specs(CorpusConfig(videos=3, clips_per_video=2, seed=7, clip_seconds=2.0))[1]
    path = corpus.clips / spec.video_id / spec.clip_id
    [clip] = decode_clips(
        str(path), [ClipRequest(clip_id=spec.clip_id, start=0.0, end=None)], DecodeConfig(num_frames=4, short_side=224)
    )
    assert isinstance(clip, DecodedClip) and clip.span == (0.0, pytest.approx(2.0, abs=0.07))
    assert clip.frame_size == (299, 224) and len(clip.frames) == 4
