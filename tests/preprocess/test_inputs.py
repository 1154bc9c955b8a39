"""Metadata, span and text parsing, the video listing and config validation (no Ray, no decoding)."""

from __future__ import annotations

import json

import pytest

from preprocess.config import InputConfig, Layout, RayConfig, ShardingConfig
from preprocess.inputs import check_span, list_source_videos, parse_time, read_texts
from preprocess.plan import metadata_files, plan_shards, read_slice


def read_metadata(uri: str, layout: Layout):
    """Every clip and problem of a metadata file, read as one shard."""
    files = metadata_files(uri)
    (piece,) = plan_shards(files, 10**9, layout)
    contents = read_slice(files, piece, layout)
    return contents.clips, contents.failures


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("00:00:00.000", 0.0),
        ("01:02:03.250", 3723.25),
        ("2:03.5", 123.5),
        ("00:00:07", 7.0),
        (12.5, 12.5),
        ("-00:00:01.000", -1.0),
    ],
)
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize(
    "raw, error",
    [
        (["00:00:01.000"], "span_invalid"),
        (["a", "b"], "span_invalid"),
        (None, "span_invalid"),
        ([True, 2], "span_invalid"),
        (["-00:00:01.000", "00:00:02.000"], "span_negative"),
        (["00:00:03.000", "00:00:02.000"], "span_reversed"),
        (["00:00:02.000", "00:00:02.000"], "span_empty"),
    ],
)
def test_bad_spans(raw, error):
    span, problem = check_span(raw)
    assert span is None and (problem.stage, problem.error) == ("span", error)


def test_span_ok():
    assert check_span(["00:00:01.500", "00:00:04.000"]) == ((1.5, 4.0), None)


def _meta(tmp_path, lines) -> str:
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_metadata_positions_and_problems(tmp_path):
    uri = _meta(
        tmp_path,
        [
            json.dumps(
                {
                    "video_id": "a",
                    "url": "u",
                    "clip": [
                        {"clip_id": "a.0", "span": ["00:00:00.000", "00:00:01.000"]},
                        {"clip_id": "a.1", "span": ["00:00:02.000", "00:00:01.000"]},
                    ],
                }
            ),
            "",
            "not json",
            json.dumps({"url": "no video id", "clip": []}),
            json.dumps(
                {"video_id": "b", "clip": [{"clip_id": "a.0", "span": ["00:00:00.000", "00:00:01.000"]}, {"span": []}]}
            ),
            json.dumps({"video_id": "../c", "clip": [{"clip_id": "c.0", "span": ["00:00:00.000", "00:00:01.000"]}]}),
        ],
    )
    clips, failures = read_metadata(uri, Layout.SOURCE)
    assert [(c.position, c.line, c.clip_id) for c in clips] == [
        (0, 1, "a.0"),
        (1, 1, "a.1"),
        (2, 5, "a.0"),
        (3, 6, "c.0"),
    ]
    assert [c.problem.error if c.problem else None for c in clips] == [
        None,
        "span_reversed",
        "duplicate_clip_id",
        "unsafe_id",
    ]
    assert [(c.problem.video_id, c.problem.clip_id, c.problem.line) for c in clips if c.problem] == [
        ("a", "a.1", 1),
        ("b", "a.0", 5),
        ("../c", "c.0", 6),
    ]
    assert [(f.line, f.error) for f in failures] == [(3, "malformed_json"), (4, "bad_record"), (5, "bad_record")]
    assert f"{uri} line 3: malformed JSON" in failures[0].message


def test_escaping_clip_ids_only_matter_for_precut_layout(tmp_path):
    ids = ["../x.mp4", "a/../../x.mp4", "/abs.mp4", "ok/inner.mp4", "fine.mp4"]
    uri = _meta(tmp_path, [json.dumps({"video_id": "v", "clip": [{"clip_id": i, "span": [0, 1]} for i in ids]})])
    precut, _ = read_metadata(uri, Layout.CLIPS)
    assert [bool(c.problem) for c in precut] == [True, True, True, False, False]
    source, _ = read_metadata(uri, Layout.SOURCE)
    assert not any(c.problem for c in source)


def test_texts(tmp_path):
    path = tmp_path / "subs.jsonl"
    path.write_bytes(
        b'{"clip_id": "a", "text": "hello"}\n{"clip_id": "b", "text": "\xff\xfe"}\n{"clip_id": "a", "text": "again"}\n'
        b'{"clip_id": "c"}\n[1\n{"clip_id": "d", "text": "' + b"x" * 50 + b'"}\n'
    )
    texts, failures = read_texts(str(path), "text", "subtitles", max_chars=10)
    assert texts["a"].text == "hello" and not texts["a"].truncated
    assert texts["b"].text == "\ufffd\ufffd" and texts["d"].text == "x" * 10 and texts["d"].truncated
    assert [(f.line, f.error, f.dropped) for f in failures] == [
        (2, "non_utf8", False),
        (3, "duplicate_text", False),
        (4, "bad_record", True),
        (5, "malformed_json", True),
    ]


def test_shards_are_chunks_of_positions(tmp_path):
    meta = _meta(
        tmp_path,
        [
            json.dumps({"video_id": f"v{i}", "clip": [{"clip_id": f"v{i}.{k}", "span": [k, k + 1]} for k in range(3)]})
            for i in range(3)
        ],
    )
    files = metadata_files(meta)
    shards = [read_slice(files, piece, Layout.SOURCE).clips for piece in plan_shards(files, 4, Layout.SOURCE)]
    assert [[c.position for c in clips] for clips in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert [c.clip_id for c in shards[1]] == ["v1.1", "v1.2", "v2.0", "v2.1"]


def test_missing_metadata_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl: not found"):
        metadata_files(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="part-\\*.jsonl: no file matches"):
        metadata_files(str(tmp_path / "part-*.jsonl"))


def test_source_listing(tmp_path):
    for name in ("a.mp4", "b.webm", "b.mp4", "noext", ".hidden.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.mp4").write_bytes(b"x")
    found = list_source_videos(str(tmp_path))
    assert found == {
        "a": str(tmp_path / "a.mp4"),
        "b": str(tmp_path / "b.mp4"),
        ".hidden": str(tmp_path / ".hidden.mp4"),
    }


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: ShardingConfig(output="o", clips_per_shard=0), "clips_per_shard"),
        (lambda: ShardingConfig(output="", clips_per_shard=1), "output"),
        (lambda: ShardingConfig(output="o", max_shard_bytes=10), "max_shard_bytes"),
        (lambda: InputConfig(metadata="m", videos="v", layout="tree"), "Layout"),
        (lambda: InputConfig(metadata="m", videos="v", max_text_chars=0), "max_text_chars"),
        (lambda: RayConfig(max_retries=-1), "max_retries"),
        (lambda: RayConfig(video_timeout_s=0), "video_timeout_s"),
        (lambda: RayConfig(video_timeout_s=60, stall_timeout_s=60), "stall_timeout_s"),
        (lambda: RayConfig(max_in_flight=0), "max_in_flight"),
    ],
)
def test_config_validation_names_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_stall_timeout_defaults_to_half_an_hour_or_twice_the_video_timeout():
    assert RayConfig().stall_limit_s == 1800.0
    assert RayConfig(video_timeout_s=1200).stall_limit_s == 2400.0
    assert RayConfig(video_timeout_s=1200, stall_timeout_s=1300).stall_limit_s == 1300.0
