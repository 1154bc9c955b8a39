"""Bad input: the job completes and records every failure with its reason (one job run per layout).

Videos come from conftest's ``made_videos`` (ffmpeg-made good and broken files). Each test
checks the failures-table row (stage, error class, message) or the stored sample.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.schema import decode_key, encode_key
from pipeline.shards import iter_dataset
from preprocess.job import run_job
from tests.preprocess.fixtures_job import PYTHON, REPO, _ts, ray_local, write_jsonl  # noqa: F401

pytestmark = pytest.mark.ray

LONG = "word " * 1000
ODD_IDS = ("sub/dir/x.mp4", "../up.mp4", "with space.mp4", "ünïcødé 字幕.mp4", "%2E.mp4")


def _clip(clip_id: str, start, end) -> dict:
    return {
        "clip_id": clip_id,
        "span": [start if isinstance(start, str) else _ts(start), end if isinstance(end, str) else _ts(end)],
    }


def _source_corpus(root: Path, made: dict[str, Path]) -> dict[str, Path]:
    videos = root / "videos"
    videos.mkdir()
    for kind in ("h264", "vfr", "random", "truncated", "truncated_tail", "empty", "unknown_codec", "audio", "text"):
        shutil.copy(made[kind], videos / f"{kind}{made[kind].suffix}")
    lines = [
        json.dumps(
            {
                "video_id": "h264",
                "url": "u",
                "clip": [
                    _clip("ok.0", 0, 1.5),
                    _clip("outside", 10, 12),
                    _clip("negative", "-00:00:01.000", 1),
                    _clip("reversed", 3, 1),
                    _clip("zero", 2, 2),
                    _clip("garbled", "1 o'clock", 2),
                    _clip("ok.0", 1, 2),
                    *[_clip(odd, 0.5, 1.5) for odd in ODD_IDS],
                    _clip("sub.empty", 0, 1),
                    _clip("sub.latin1", 0, 1),
                    _clip("sub.long", 0, 1),
                ],
            }
        ),
        '{"video_id": "broken", "clip": [',
        *[
            json.dumps({"video_id": kind, "url": "u", "clip": [_clip(f"{kind}.0", 0.5, 1.5)]})
            for kind in (
                "vfr",
                "random",
                "truncated",
                "truncated_tail",
                "empty",
                "unknown_codec",
                "audio",
                "text",
                "missing",
            )
        ],
    ]
    (root / "meta.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    subs = [
        json.dumps({"clip_id": "sub.empty", "text": ""}).encode(),
        b'{"clip_id": "sub.latin1", "text": "caf\xe9 cr\xe8me"}',
        json.dumps({"clip_id": "sub.long", "text": LONG}).encode(),
        b'{"clip_id": "ok.0", "text": "the first ok.0"}',
    ]
    (root / "subs.jsonl").write_bytes(b"\n".join(subs) + b"\n")
    return {"metadata": root / "meta.jsonl", "videos": videos, "subtitles": root / "subs.jsonl"}


def _config(paths: dict[str, Path], out: Path, *extra: str):
    from preprocess.shard import build_config, build_parser

    args = [
        "--metadata",
        str(paths["metadata"]),
        "--videos",
        str(paths["videos"]),
        "--output",
        str(out),
        "--clips-per-shard",
        "4",
        "--num-frames",
        "3",
        "--short-side",
        "48",
        "--max-text-chars",
        "100",
        *("--require-texts", "none", "--max-missing-videos", "1"),  # bad inputs on purpose: missing ones too
        "--no-progress",
        *extra,
    ]
    if "subtitles" in paths:
        args += ["--subtitles", str(paths["subtitles"])]
    return build_config(build_parser().parse_args(args))


@pytest.fixture(scope="module")
def source_run(made_videos, ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    paths = _source_corpus(root, made_videos)
    out = root / "out"
    result = run_job(_config(paths, out))
    rows = pq.read_table(out / "failures.parquet").to_pylist()
    samples = {s.meta.clip_id: s for s in iter_dataset(str(out))}
    return result, rows, samples


def _row(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row matching {match}, got {found} in {rows}"
    return found[0]


def test_job_completes_and_accounts_for_every_clip(source_run):
    result, rows, samples = source_run
    assert result.manifest, result.summary()
    dropped = [r for r in rows if r["dropped"] and r["position"] >= 0]
    assert result.ok == len(samples) and result.ok + len(dropped) == result.clips
    assert sum(result.failed.values()) == len(dropped)


@pytest.mark.parametrize(
    "kind, stage, errors",
    [
        ("random", "open", {"corrupt_file"}),
        ("text", "open", {"corrupt_file"}),
        ("empty", "open", {"empty_file"}),
        ("truncated_tail", "open", {"corrupt_file"}),
        ("unknown_codec", "probe", {"unsupported_codec"}),
        ("audio", "probe", {"no_video_stream"}),
    ],
)
def test_unreadable_files(source_run, kind, stage, errors):
    row = _row(source_run[1], clip_id=f"{kind}.0")
    assert (row["stage"], row["video_id"], row["dropped"]) == (stage, kind, True)
    assert row["error"] in errors and f"{kind}." in row["message"]


def test_truncated_file_fails_or_keeps_only_real_frames(source_run):
    _, rows, samples = source_run
    if "truncated.0" in samples:  # the cut is after the clip's frames: a valid clip
        assert len(samples["truncated.0"].frames) == 3
    else:
        row = _row(rows, clip_id="truncated.0")
        assert row["stage"] == "decode" and row["error"] in {"truncated_stream", "decode_error", "no_frames"}


def test_missing_file(source_run):
    row = _row(source_run[1], clip_id="missing.0")
    assert (row["stage"], row["error"]) == ("open", "missing_file") and "missing.<ext>" in row["message"]


@pytest.mark.parametrize(
    "clip_id, error",
    [
        ("outside", "span_out_of_range"),
        ("negative", "span_negative"),
        ("reversed", "span_reversed"),
        ("zero", "span_empty"),
        ("garbled", "span_invalid"),
    ],
)
def test_bad_spans(source_run, clip_id, error):
    row = _row(source_run[1], clip_id=clip_id)
    assert (row["stage"], row["error"], row["video_id"]) == ("span", error, "h264")
    assert clip_id == "outside" or "meta.jsonl line 1" in row["message"]


def test_malformed_json_line_has_its_line_number(source_run):
    row = _row(source_run[1], error="malformed_json")
    assert (row["stage"], row["line"], row["position"]) == ("metadata", 2, -1)
    assert "meta.jsonl line 2: malformed JSON" in row["message"]


def test_duplicate_clip_id_second_one_fails(source_run):
    _, rows, samples = source_run
    row = _row(rows, clip_id="ok.0")
    assert (row["error"], row["stage"], row["position"]) == ("duplicate_clip_id", "metadata", 6)
    assert samples["ok.0"].meta.span == (0.0, 1.5) and samples["ok.0"].subtitle == "the first ok.0"


@pytest.mark.parametrize("clip_id", ODD_IDS)
def test_odd_clip_ids_are_stored_under_safe_keys(source_run, clip_id):
    sample = source_run[2][clip_id]
    assert (
        "/" not in sample.key
        and "." not in sample.key
        and decode_key(sample.key) == clip_id == decode_key(encode_key(clip_id))
    )


def test_subtitles_empty_non_utf8_and_long(source_run):
    result, rows, samples = source_run
    assert samples["sub.empty"].subtitle == "" and samples["sub.empty"].meta.subtitle_source.kind == "given"
    assert samples["sub.latin1"].subtitle == "caf\ufffd cr\ufffdme"
    row = _row(rows, error="non_utf8")
    assert (row["stage"], row["line"], row["dropped"]) == (
        "subtitles",
        2,
        False,
    ) and "subs.jsonl line 2: not UTF-8" in row["message"]
    long = samples["sub.long"]
    assert long.subtitle == LONG[:100] and long.meta.subtitle_source.truncated
    assert result.texts["subtitle_truncated"] == 1 and result.texts["subtitle_empty"] == 1


def test_variable_frame_rate_uses_timestamps(source_run):
    sample = source_run[2]["vfr.0"]
    times = sample.meta.frame_times
    assert len(times) == 3 and list(times) == sorted(times) and 0.5 <= times[0] and times[-1] <= 1.5


# --------------------------------------------------------------------------- pre-cut layout


def test_precut_layout_rejects_escaping_ids_and_reports_missing_clips(made_videos, ray_local, tmp_path):
    videos = tmp_path / "clips"
    (videos / "v1" / "sub").mkdir(parents=True)
    shutil.copy(made_videos["h264"], videos / "v1" / "v1.0.mp4")
    shutil.copy(made_videos["vp9"], videos / "v1" / "sub" / "v1.1.webm")
    (tmp_path / "secret.mp4").write_bytes(made_videos["h264"].read_bytes())
    write_jsonl(
        tmp_path / "meta.jsonl",
        [
            {
                "video_id": "v1",
                "clip": [
                    _clip("v1.0.mp4", 10, 14),
                    _clip("sub/v1.1.webm", 0, 4),
                    _clip("../../secret.mp4", 0, 4),
                    _clip("v1.9.mp4", 0, 4),
                ],
            },
            {"video_id": "..", "clip": [_clip("secret.mp4", 0, 4)]},
        ],
    )
    out = tmp_path / "out"
    result = run_job(_config({"metadata": tmp_path / "meta.jsonl", "videos": videos}, out, "--layout", "clips"))
    rows = pq.read_table(out / "failures.parquet").to_pylist()
    assert [(r["clip_id"], r["error"]) for r in rows] == [
        ("../../secret.mp4", "unsafe_id"),
        ("v1.9.mp4", "missing_file"),
        ("secret.mp4", "unsafe_id"),
    ]
    assert "would point outside its video's folder" in rows[0]["message"]
    samples = list(iter_dataset(str(out)))
    assert [s.meta.clip_id for s in samples] == ["v1.0.mp4", "sub/v1.1.webm"] and result.ok == 2
    assert (
        samples[0].meta.span[0] >= 10 and samples[0].meta.frame_times[0] >= 10
    )  # pre-cut times on the source timeline


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clips-per-shard", "0"], "clips_per_shard must be >= 1"),
        (["--num-frames", "0"], "num_frames must be in 1..1024"),
        (["--layout", "tree"], "invalid choice: 'tree'"),
        (["--frame-size", "224"], "expected WIDTHxHEIGHT such as 224x224, got '224'"),
        (["--frame-size", "8x224"], "frame_size must be None or (width, height) within 16..4096"),
        (
            ["--frame-size", "224x224", "--short-side", "224"],
            "give frame_size (exact size) or short_side (aspect kept), not both",
        ),
        (["--num-cpus", "2", "--ray-address", "ray://head:10001"], "num_cpus applies to a new local cluster"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, message):
    cmd = [PYTHON, str(REPO / "preprocess/shard.py"), "--metadata", "m.jsonl", "--videos", "v", "--output", "o", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("preprocess/shard.py: error:")


def test_missing_metadata_file_is_a_clear_error(tmp_path):
    cmd = [
        PYTHON,
        str(REPO / "preprocess/shard.py"),
        "--metadata",
        str(tmp_path / "nope.jsonl"),
        "--videos",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope.jsonl: not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_stores_the_training_size_unless_told_otherwise():
    from preprocess.shard import build_config, build_parser

    base = ["--metadata", "m.jsonl", "--videos", "v", "--output", "o"]
    assert build_config(build_parser().parse_args(base)).decode.frame_size == (224, 224)
    kept = build_config(build_parser().parse_args([*base, "--short-side", "160"])).decode
    assert kept.frame_size is None and kept.short_side == 160
