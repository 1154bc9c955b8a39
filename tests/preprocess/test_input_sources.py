"""The job on metadata in several parts and with texts from every kind of source: the same clips, texts and
bytes whatever the split or the number of workers, and a worker killed mid-job changes nothing."""

from __future__ import annotations

import json

import pytest

from pipeline.shards import iter_dataset
from preprocess.faults import FAULT_EXIT_ENV
from preprocess.job import run_job
from tests.preprocess.fixtures_job import config, corpus, ray_local  # noqa: F401

pytestmark = pytest.mark.ray


def _split(corpus: dict, root, parts: int) -> dict:
    """The corpus with its metadata in ``parts`` files part-0..., its captions as a JSON list (the release's form)."""
    lines = corpus["metadata"].read_text().splitlines()
    root.mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        (root / f"part-{k}.jsonl").write_text("".join(line + "\n" for line in lines[k::parts]))
    captions = [json.loads(line) for line in corpus["captions"].read_text().splitlines()]
    (root / "captions.json").write_text(
        json.dumps([{"image_id": c["clip_id"], "caption": c["caption"]} for c in captions])
    )
    return {**corpus, "metadata": root / "part-*.jsonl", "captions": root / "captions.json"}


def _samples(out) -> list:
    return [(s.meta.clip_id, s.frames, s.subtitle, s.caption) for s in iter_dataset(str(out))]


def _tars(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def single(corpus, ray_local, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("single")
    assert run_job(config(corpus, out)).manifest
    return out


def test_parts_and_a_caption_list_give_the_same_samples(corpus, single, tmp_path):  # noqa: F811
    split = _split(corpus, tmp_path / "in", parts=3)
    one, many = tmp_path / "one", tmp_path / "many"
    first = run_job(config(split, one, "--max-in-flight", "1"))
    second = run_job(config(split, many, "--max-in-flight", "4"))
    assert first.manifest and second.manifest and first.ok == 12
    assert _tars(one) == _tars(many)  # 1 vs N workers: byte-identical
    assert (one / "manifest.json").read_bytes() == (many / "manifest.json").read_bytes()
    # the parts hold the videos in another order (every third line): same clips per video, same texts
    assert sorted(_samples(one), key=lambda s: s[0]) == sorted(
        [(c, f, s, cap) for c, f, s, cap in _samples(single)], key=lambda s: s[0]
    )


def test_a_worker_killed_mid_job_changes_nothing(corpus, tmp_path, monkeypatch):  # noqa: F811
    split = _split(corpus, tmp_path / "in", parts=2)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert run_job(config(split, clean)).manifest
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULT_EXIT_ENV, f"1:{marker}")
    result = run_job(config(split, killed))
    assert marker.exists() and result.manifest and not result.shards_failed
    assert _tars(killed) == _tars(clean)
    assert (killed / "failures.parquet").read_bytes() == (clean / "failures.parquet").read_bytes()


def test_lmdb_subtitles_and_inline_captions(corpus, single, tmp_path):  # noqa: F811
    lmdb = pytest.importorskip("lmdb", reason="lmdb is not installed")
    subtitles = [json.loads(line) for line in corpus["subtitles"].read_text().splitlines()]
    captions = {
        json.loads(line)["clip_id"]: json.loads(line)["caption"] for line in corpus["captions"].read_text().splitlines()
    }
    db = tmp_path / "subs.lmdb"
    with lmdb.open(str(db), map_size=1 << 20) as env, env.begin(write=True) as txn:
        for row in subtitles:
            txn.put(row["clip_id"].encode(), row["text"].encode())
    inline = tmp_path / "meta.jsonl"
    records = [json.loads(line) for line in corpus["metadata"].read_text().splitlines()]
    for record in records:
        for clip in record["clip"]:
            clip["caption"] = captions[clip["clip_id"]]
    inline.write_text("".join(json.dumps(r) + "\n" for r in records))
    inputs = {**corpus, "metadata": inline, "subtitles": db, "captions": None}
    out = tmp_path / "out"
    args = config(inputs, out)
    assert run_job(args).manifest
    got = [(s.meta.clip_id, s.subtitle, s.caption) for s in iter_dataset(str(out))]
    assert got == [(c, s, cap) for c, _, s, cap in _samples(single)]
    origins = {s.meta.subtitle_source.origin for s in iter_dataset(str(out))}
    assert origins == {str(db)}
    before = _tars(out)
    rerun = run_job(args)
    assert rerun.shards_run == 0 and _tars(out) == before
