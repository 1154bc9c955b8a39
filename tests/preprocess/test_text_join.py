"""The text join (preprocess/text/join.py, wired in preprocess/job.py ``join_texts``) on a real local Ray cluster.

The reference is the plain in-memory join of preprocess/inputs.py (``read_text_source`` into dicts, looked up by
clip id): the per-shard files must hold exactly its texts, and the failures table its problems (less the second
texts of clip ids that are not in the metadata, which the join does not report).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.layout import DatasetLayout
from preprocess.failures import read_table
from preprocess.inputs import read_text_source
from preprocess.job import join_texts
from preprocess.text import join as text_join
from tests.preprocess.fixtures_job import ray_local  # noqa: F401

MAX_CHARS = 24
CLIPS_PER_SHARD = 4


def _subtitle_lines() -> list[bytes]:
    lines = [json.dumps({"clip_id": f"c{i:02d}", "text": f"subtitle {i} " * (i % 4)}).encode() for i in range(20)]
    lines[3] = b'{"clip_id": "c03", "text": "broken'  # malformed JSON
    lines[5] = b""  # a blank line: counted, skipped
    lines[7] = json.dumps({"clip_id": "c07"}).encode()  # no text: bad record
    lines[9] = '{"clip_id": "c09", "text": "caf\u00e9 ok"}'.encode()
    lines[11] = b'{"clip_id": "c11", "text": "bad \xff\xfe bytes"}'  # not UTF-8: kept, reported
    lines += [
        json.dumps({"clip_id": "c02", "text": "a second subtitle for c02"}).encode(),  # duplicate: first wins
        json.dumps({"clip_id": "zz-not-in-metadata", "text": "orphan"}).encode(),
        json.dumps({"clip_id": "zz-not-in-metadata", "text": "orphan again"}).encode(),  # not reported
        b'{"clip_id": "c13", "text": "\xc3 duplicate and bad bytes"}',
        json.dumps({"clip_id": "\u5b57\u5e55", "text": "\u5b57\u5e55 " * 20}, ensure_ascii=False).encode(),
        b"[1, 2]",
        json.dumps({"clip_id": "c17", "text": "no newline at the end"}).encode(),
    ]
    return lines


def _captions() -> list:
    caps = [{"image_id": f"c{i:02d}", "caption": f"caption of clip {i} " * (1 + i % 3)} for i in range(0, 20, 2)]
    return caps + [
        {"image_id": "c04", "caption": "second caption of c04"},
        {"image_id": "c05"},
        "not a record",
        {"clip_id": "c19", "caption": "a clip_id key works too"},
    ]


def _clip_ids() -> list[str]:
    ids = [f"c{i:02d}" for i in range(20)] + ["\u5b57\u5e55", "c02", "missing-1", "missing-2", "missing-3"]
    return ids + [f"empty-{i}" for i in range(CLIPS_PER_SHARD)]  # the last shard: no texts at all


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("texts")
    subs, caps = root / "subs.jsonl", root / "caps.json"
    subs.write_bytes(b"\n".join(_subtitle_lines()))
    caps.write_text(json.dumps(_captions()), encoding="utf-8")
    return {"subtitles": str(subs), "captions": str(caps)}


def clip_rows(ids: list[str] | None = None) -> list[dict]:
    ids = _clip_ids() if ids is None else ids
    return [{"shard": p // CLIPS_PER_SHARD, "position": p, "clip_id": c} for p, c in enumerate(ids)]


def reference(sources: dict[str, str], rows: list[dict]) -> tuple[dict[int, bytes], list[dict]]:
    """The in-memory join: per-shard file bytes and the failure rows, from preprocess/inputs.py's readers."""
    texts, failures = {}, []
    for stage, field in text_join.STAGES.items():
        texts[stage], found = read_text_source(sources[stage], field, stage, MAX_CHARS)
        failures += found
    ids = {r["clip_id"] for r in rows}
    failures = [f for f in failures if f.error != "duplicate_text" or f.clip_id in ids]
    shards: dict[int, list[dict]] = {r["shard"]: [] for r in rows}
    for row in rows:
        entry = {s: vars(texts[s][row["clip_id"]]) for s in text_join.STAGES if row["clip_id"] in texts[s]}
        if entry:
            shards[row["shard"]].append({"position": row["position"], **entry})
    expected = [{"shard": -1, "position": -1, **vars(f)} for f in failures]
    return {k: text_join.shard_lines(v) for k, v in shards.items()}, expected


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "texts").glob("shard-*.jsonl"))}


def failure_rows(out: DatasetLayout) -> list[dict]:
    return read_table(out.text_failures).to_pylist()


@pytest.mark.ray
def test_join_equals_the_in_memory_join_and_is_deterministic(ray_local, inputs, tmp_path):
    rows = clip_rows()
    expected_files, expected_failures = reference(inputs, rows)
    out = DatasetLayout(str(tmp_path / "a"))
    result = join_texts(rows, inputs, MAX_CHARS, out, num_partitions=2, range_bytes=64)

    got = files(tmp_path / "a")
    assert got == {f"shard-{k:06d}.jsonl": v for k, v in expected_files.items()}
    assert got["shard-000007.jsonl"] == b""  # a shard whose clips have no text still gets its file
    assert failure_rows(out) == expected_failures
    assert {f["error"] for f in expected_failures} >= {"malformed_json", "bad_record", "non_utf8", "duplicate_text"}
    assert result.shards == len(expected_files) and result.failures == len(expected_failures)
    assert result.texts["subtitles"] == sum(b.count(b'"subtitles"') for b in expected_files.values())

    texts = text_join.shard_texts(out, 0)
    assert texts[2][0].text == "subtitle 2 subtitle 2 " and not texts[2][0].truncated
    assert texts[0][1].origin == inputs["captions"] and texts[1][1] is None
    assert text_join.shard_texts(out, 3)[15][0] == text_join.TextEntry(
        text="subtitle 15 subtitle 15 ", truncated=True, origin=inputs["subtitles"]
    )
    assert text_join.shard_texts(out, 5)[21] == texts[2]  # c02 again, at position 21

    other = DatasetLayout(str(tmp_path / "b"))
    join_texts(rows, inputs, MAX_CHARS, other, num_partitions=5, range_bytes=1 << 20)
    assert files(tmp_path / "b") == got
    assert storage.read_bytes(other.text_failures) == storage.read_bytes(out.text_failures)

    marker = storage.read_bytes(out.texts_marker)
    again = join_texts(rows, inputs, MAX_CHARS, out, num_partitions=3)
    assert again.skipped and dataclasses.replace(again, skipped=False) == result
    assert storage.read_bytes(out.texts_marker) == marker


@pytest.mark.ray
def test_a_small_join_in_the_driver_writes_the_same_bytes(ray_local, inputs, tmp_path):
    rows = clip_rows()
    ray_join = DatasetLayout(str(tmp_path / "ray"))
    join_texts(rows, inputs, MAX_CHARS, ray_join, num_partitions=3, range_bytes=64)
    local = DatasetLayout(str(tmp_path / "local"))
    assert text_join.JoinSpec.of(inputs, MAX_CHARS).local(len(rows))
    result = join_texts(rows, inputs, MAX_CHARS, local, range_bytes=64)  # no partitions given: small, so here
    assert files(tmp_path / "local") == files(tmp_path / "ray") and len(files(tmp_path / "local")) == 8
    assert storage.read_bytes(local.text_failures) == storage.read_bytes(ray_join.text_failures)
    assert result == dataclasses.replace(json_result(ray_join), seconds=result.seconds)


def json_result(out: DatasetLayout) -> text_join.TextJoinResult:
    found = json.loads(storage.read_bytes(out.texts_marker))["result"]
    return text_join.TextJoinResult(**found)


@pytest.mark.ray
def test_sources_and_output_on_s3(ray_local, inputs, s3_bucket, tmp_path):
    sources = {}
    for stage, path in inputs.items():
        sources[stage] = f"{s3_bucket}/in/{Path(path).name}"
        storage.put_file(path, sources[stage])
    rows = clip_rows()
    out = DatasetLayout(f"{s3_bucket}/out")
    join_texts(rows, sources, MAX_CHARS, out, num_partitions=3, range_bytes=100)

    expected_files, expected_failures = reference(sources, rows)
    for k, data in expected_files.items():
        assert storage.read_bytes(out.texts(k)) == data
    assert failure_rows(out) == expected_failures
    assert any(sources["subtitles"] in f["message"] for f in expected_failures)


@pytest.mark.ray
def test_a_broken_caption_list_stops_the_join(ray_local, tmp_path):
    bad = tmp_path / "caps.json"
    bad.write_text('[{"image_id": "c00", "caption": "x"}, ')
    with pytest.raises(ValueError, match="malformed JSON"):
        join_texts(clip_rows(["c00"]), {"captions": str(bad)}, MAX_CHARS, DatasetLayout(str(tmp_path / "o")), 1)
    assert not (tmp_path / "o" / "texts" / "_joined.json").exists()


# --------------------------------------------------------------------------- without Ray


def test_byte_ranges_own_each_line_once(tmp_path):
    """Whatever the range size, the ranges' lines are the file's lines, each once, with its byte offset."""
    data = b"\n".join(_subtitle_lines()) + b"\n\n\nlast"
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    whole = list(text_join._range_lines(str(path), 0, len(data)))
    assert [raw for _, raw in whole] == data.splitlines(keepends=True)
    for size in (1, 2, 7, 64, 1000):
        starts = range(0, len(data), size)
        pieces = [line for start in starts for line in text_join._range_lines(str(path), start, start + size)]
        assert pieces == whole


def test_spec_checks_its_sources(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    (tmp_path / "db.lmdb").mkdir()
    with pytest.raises(ValueError, match="not joined"):
        text_join.JoinSpec.of({"subtitles": str(tmp_path / "db.lmdb")}, 10)
    with pytest.raises(ValueError, match="unknown text stage"):
        text_join.JoinSpec.of({"subtitles": str(tmp_path / "t.jsonl"), "asr": str(tmp_path / "t.jsonl")}, 10)
    with pytest.raises(ValueError, match="not found"):
        text_join.JoinSpec.of({"captions": str(tmp_path / "none.jsonl")}, 10)
    spec = text_join.JoinSpec.of({"captions": str(tmp_path / "t.jsonl")}, 10)
    assert spec.read_items() == [{"stage": 1, "part": 0, "start": 0, "end": 0}]
