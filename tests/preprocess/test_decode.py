"""The clip decoder on real files: frame choice and pixels vs a decode-everything reference, bad input."""

from __future__ import annotations

import io
import math
import os

import av
import numpy as np
import pytest
from PIL import Image

from preprocess.decode import (
    ClipRequest,
    DecodeConfig,
    DecodedClip,
    decode_clips,
    output_size,
    target_times,
)
from preprocess.failures import Failure


def _clip(cid: str, start: float, end: float | None) -> ClipRequest:
    return ClipRequest(clip_id=cid, start=start, end=end)


def _reference(path, times: set[float]) -> tuple[list[float], dict[float, np.ndarray]]:
    """Decode every frame naively with PyAV; return all frame times and the RGB frames at ``times``."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        all_times, images = [], {}
        for frame in container.decode(stream):
            t = float((frame.pts - start) * stream.time_base)
            all_times.append(t)
            hit = next((x for x in times if abs(x - t) < 1e-6), None)
            if hit is not None:
                images[hit] = frame.to_ndarray(format="rgb24")
    return all_times, images


def _expected_time(all_times: list[float], target: float, span: tuple[float, float]) -> float:
    after = [t for t in all_times if t >= target - 1e-6]
    if not after:
        return all_times[-1]
    before = [t for t in all_times if t < after[0]]
    if after[0] >= span[1] and before and before[-1] >= span[0]:
        return before[-1]
    return after[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _check_against_reference(path, results, cfg: DecodeConfig) -> None:
    decoded = [r for r in results if isinstance(r, DecodedClip)]
    assert decoded and len(decoded) == len(results), results
    wanted = {t for r in decoded for t in r.frame_times}
    all_times, images = _reference(path, wanted)
    for r in decoded:
        assert list(r.frame_times) == sorted(r.frame_times)
        expected = [_expected_time(all_times, t, r.span) for t in target_times(*r.span, cfg)]
        assert r.frame_times == pytest.approx(expected, abs=1e-6), r.clip_id
        for jpeg, t in zip(r.frames, r.frame_times):
            ours = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))  # luma: JPEG halves chroma
            assert (ours.shape[1], ours.shape[0]) == r.frame_size
            ref = np.asarray(Image.fromarray(images[t]).resize(r.frame_size, Image.BICUBIC).convert("L"))
            assert _psnr(ours, ref) > 30, (r.clip_id, t)


@pytest.mark.parametrize(
    "name,size,frame_size",
    [
        ("bigbuckbunny.mp4", (398, 224), None),
        ("bikes.mp4", (527, 224), None),
        ("bigbuckbunny.mp4", (224, 224), (224, 224)),
    ],
)
def test_real_videos_match_decode_everything(real_videos, name, size, frame_size):
    path = real_videos[name]
    cfg = DecodeConfig(
        num_frames=6, seek_gap=1.5, **({"frame_size": frame_size} if frame_size else {"short_side": 224})
    )
    clips = [_clip("late", 3.1, 4.9), _clip("early", 0.2, 1.4), _clip("overlap", 1.0, 2.0), _clip("tail", 4.5, 60.0)]
    results = list(decode_clips(str(path), clips, cfg))
    assert [r.clip_id for r in results] == ["late", "early", "overlap", "tail"]
    assert all(isinstance(r, DecodedClip) and r.frame_size == size and len(r.frames) == 6 for r in results)
    tail = results[3]
    assert tail.span[0] == 4.5 and tail.span[1] == pytest.approx(5.28 if name == "bigbuckbunny.mp4" else 10.0, abs=0.05)
    _check_against_reference(path, results, cfg)


@pytest.mark.parametrize("kind", ["h264", "vp9", "mpeg2", "vfr"])
def test_codecs_and_vfr_match_decode_everything(made_videos, kind):
    cfg = DecodeConfig(fps=5.0, max_frames=8, short_side=0)  # resizing is checked on the real videos
    clips = [_clip("a", 0.3, 1.7), _clip("b", 1.9, 3.9), _clip("all", 0.0, None)]
    results = list(decode_clips(str(made_videos[kind]), clips, cfg))
    a, b, whole = results
    assert len(a.frames) == 7 and len(b.frames) == 8 and len(whole.frames) == 8  # 3.9-1.9 s at 5 fps = 10, capped
    assert a.frame_size == (160, 120)
    for r in results:
        assert r.span[0] <= r.frame_times[0] and r.frame_times[-1] < r.span[1]
        assert all(x < y for x, y in zip(r.frame_times, r.frame_times[1:]))
    _check_against_reference(made_videos[kind], results, cfg)


def test_decoder_threads_give_the_same_frames(made_videos):
    clips = [_clip("a", 0.3, 1.7), _clip("b", 1.9, 3.9)]
    one = list(decode_clips(str(made_videos["h264"]), clips, DecodeConfig(num_frames=5, threads=1)))
    two = list(decode_clips(str(made_videos["h264"]), clips, DecodeConfig(num_frames=5, threads=2)))
    assert [r.frame_times for r in one] == [r.frame_times for r in two]


def test_target_times_and_sizes():
    assert target_times(2.0, 4.0, DecodeConfig(num_frames=4)) == (2.25, 2.75, 3.25, 3.75)
    assert target_times(1.0, 2.0, DecodeConfig(fps=4.0)) == (1.0, 1.25, 1.5, 1.75)
    assert len(target_times(0.0, 100.0, DecodeConfig(fps=3.0, max_frames=32))) == 32
    assert output_size(1280, 720, 224) == (398, 224)
    assert output_size(720, 1280, 224) == (224, 398)
    assert output_size(160, 120, 0) == (160, 120)
    assert output_size(1280, 720, 224, (224, 224)) == (224, 224)


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_frames", 0),
        ("fps", -1.0),
        ("short_side", -5),
        ("jpeg_quality", 0),
        ("threads", 0),
        ("max_frames", 0),
        ("frame_size", (224,)),
        ("frame_size", (8, 224)),
        ("frame_size", (224.0, 224)),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**{field: value})


@pytest.mark.parametrize(
    "start,end,error",
    [
        (-1.0, 2.0, "span_negative"),
        (3.0, 2.0, "span_reversed"),
        (2.0, 2.0, "span_empty"),
        (4.5, 6.0, "span_out_of_range"),
        (3.99, 9.0, "span_out_of_range"),
        (math.nan, 2.0, "span_invalid"),
    ],
)
def test_bad_spans_fail_only_their_clip(made_videos, start, end, error):
    path = str(made_videos["h264"])
    results = list(
        decode_clips(
            path, [_clip("ok1", 0.0, 1.0), _clip("bad", start, end), _clip("ok2", 1.0, 2.0)], DecodeConfig(num_frames=2)
        )
    )
    assert [type(r) for r in results] == [DecodedClip, Failure, DecodedClip]
    bad = results[1]
    assert (bad.clip_id, bad.stage, bad.error) == ("bad", "span", error)
    assert path in bad.message


@pytest.mark.parametrize(
    "kind,stage,error",
    [
        ("missing", "open", "missing_file"),
        ("empty", "open", "empty_file"),
        ("truncated_tail", "open", "corrupt_file"),
        ("random", "open", "corrupt_file"),
        ("text", "open", "corrupt_file"),
        ("audio", "probe", "no_video_stream"),
        ("unknown_codec", "probe", "unsupported_codec"),
    ],
)
def test_bad_files_fail_every_clip(made_videos, tmp_path, kind, stage, error):
    path = str(tmp_path / "absent.mp4") if kind == "missing" else str(made_videos[kind])
    results = list(decode_clips(path, [_clip("a", 0.0, 1.0), _clip("b", 0.0, None)], DecodeConfig()))
    assert [(r.clip_id, r.stage, r.error) for r in results] == [("a", stage, error), ("b", stage, error)]
    assert all(isinstance(r, Failure) and path in r.message for r in results)


def test_truncated_file_keeps_clips_before_the_cut(made_videos):
    path = str(made_videos["truncated"])  # header says 4 s; the data stops near 2 s
    early, late = decode_clips(path, [_clip("early", 0.0, 1.0), _clip("late", 3.0, 4.0)], DecodeConfig(num_frames=3))
    assert isinstance(early, DecodedClip) and len(early.frames) == 3
    assert isinstance(late, Failure) and (late.stage, late.error) == ("decode", "truncated_stream")
    assert path in late.message


def test_file_is_opened_once_for_all_clips(made_videos, tmp_path):
    path = tmp_path / "once.mp4"
    path.write_bytes(made_videos["h264"].read_bytes())
    gen = decode_clips(
        str(path), [_clip(f"c{i}", 0.8 * i, 0.8 * i + 0.8) for i in range(4)], DecodeConfig(num_frames=3)
    )
    first = next(gen)
    os.unlink(path)  # a decoder that reopened the file per clip would now fail with missing_file
    rest = list(gen)
    assert all(isinstance(r, DecodedClip) for r in [first, *rest]) and len(rest) == 3


def test_closing_early_releases_the_file(made_videos):
    gen = decode_clips(str(made_videos["h264"]), [_clip("a", 0.0, 1.0), _clip("b", 2.0, 3.0)], DecodeConfig())
    assert isinstance(next(gen), DecodedClip)
    gen.close()


def test_frames_are_stored_at_the_training_size_unless_told_otherwise():
    assert DecodeConfig().frame_size == (224, 224)
    assert DecodeConfig(short_side=224).frame_size is None
    assert DecodeConfig(frame_size=(320, 180)).frame_size == (320, 180)
    with pytest.raises(ValueError, match="frame_size .* or short_side .*not both"):
        DecodeConfig(short_side=224, frame_size=(224, 224))
