"""The streaming shard plan: slices cover every clip and problem exactly once, across files; plan-only; memory."""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys

import pytest

from preprocess.config import Layout
from preprocess.plan import ShardSlice, metadata_files, plan_shards, read_slice
from tests.preprocess.fixtures_job import REPO


def _write_parts(root, seed: int, num_files: int) -> tuple[list[str], list[str], int]:
    """Metadata parts with bad lines, blank lines, entries without ids, empty records and duplicate ids; returns
    (files, clip ids in position order, number of problems that yield no clip)."""
    rng = random.Random(seed)
    files, clip_ids, problems = [], [], 0
    for f in range(num_files):
        lines = []
        for n in range(rng.randint(0, 25)):
            roll = rng.random()
            if roll < 0.08:
                lines.append("not json")
                problems += 1
                continue
            if roll < 0.12:
                lines.append("")
                continue
            if roll < 0.15:
                lines.append(json.dumps({"url": "no video id"}))
                problems += 1
                continue
            video = f"v{f}-{n}"
            entries = []
            for k in range(rng.randint(0, 8)):
                if rng.random() < 0.1:
                    entries.append({"span": [0, 1]})
                    problems += 1
                    continue
                clip_id = f"{video}.{k}" if rng.random() > 0.05 else "same"
                entries.append({"clip_id": clip_id, "span": [k, k + 1]})
                clip_ids.append(clip_id)
            lines.append(json.dumps({"video_id": video, "clip": entries}))
        path = root / f"part-{f:02d}.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        files.append(str(path))
    return files, clip_ids, problems


@pytest.mark.parametrize("seed", range(12))
def test_slices_hold_every_clip_and_problem_once(tmp_path, seed):
    files, clip_ids, problems = _write_parts(tmp_path, seed, num_files=1 + seed % 3)
    n = 1 + seed % 7
    slices = list(plan_shards(files, n, Layout.SOURCE))
    got, failures = [], 0
    for k, piece in enumerate(slices):
        contents = read_slice(files, piece, Layout.SOURCE)
        assert piece.index == k and piece.clips == len(contents.clips) == min(n, len(clip_ids) - k * n)
        assert [c.position for c in contents.clips] == list(range(k * n, k * n + piece.clips))
        got += [c.clip_id for c in contents.clips]
        failures += len(contents.failures)
    assert got == clip_ids
    if slices:  # bad lines and entries without an id: each recorded by exactly one shard
        assert failures == problems
    else:
        assert not clip_ids


def test_a_glob_and_a_list_read_parts_in_order(tmp_path):
    files, clip_ids, _ = _write_parts(tmp_path, 3, num_files=3)
    assert metadata_files(str(tmp_path / "part-*.jsonl")) == files
    assert metadata_files(f"{files[2]},{files[0]}") == [files[2], files[0]]
    (piece,) = plan_shards(files, 10**6, Layout.SOURCE)
    assert [c.clip_id for c in read_slice(files, piece, Layout.SOURCE).clips] == clip_ids


def test_duplicates_within_a_record_and_within_a_shard(tmp_path):
    lines = [
        {"video_id": "a", "clip": [{"clip_id": "x", "span": [0, 1]}, {"clip_id": "y", "span": [1, 2]}]},
        {"video_id": "b", "clip": [{"clip_id": "x", "span": [0, 1]}, {"clip_id": "z", "span": [1, 2]}]},
        {"video_id": "c", "clip": [{"clip_id": "w", "span": [0, 1]}, {"clip_id": "w", "span": [1, 2]}]},
    ]
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    files = [str(path)]
    errors = [
        [c.problem.error if c.problem else None for c in read_slice(files, piece, Layout.SOURCE).clips]
        for piece in plan_shards(files, 5, Layout.SOURCE)
    ]
    # b's x repeats a's in the same shard; c's second w repeats the first in its record, across the shard boundary
    assert errors == [[None, None, "duplicate_clip_id", None, None], ["duplicate_clip_id"]]


def test_a_slice_that_starts_and_ends_inside_one_line(tmp_path):
    path = tmp_path / "meta.jsonl"
    clips = [{"clip_id": f"c{k}", "span": [k, k + 1]} for k in range(10)]
    path.write_text(json.dumps({"video_id": "v", "clip": clips[:3] + [{"bad": 1}] + clips[3:]}) + "\n")
    files = [str(path)]
    slices = list(plan_shards(files, 4, Layout.SOURCE))
    assert [(p.start.skip, p.end.skip) for p in slices] == [(0, 4), (4, 8), (8, 0)]
    parts = [read_slice(files, p, Layout.SOURCE) for p in slices]
    assert [[c.clip_id for c in part.clips] for part in parts] == [
        ["c0", "c1", "c2", "c3"],
        [f"c{k}" for k in range(4, 8)],
        ["c8", "c9"],
    ]
    assert [len(part.failures) for part in parts] == [1, 0, 0]  # the entry without an id follows c2: shard 0's
    assert isinstance(slices[0], ShardSlice)


def _shard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "preprocess/shard.py"), *args], capture_output=True, text=True, timeout=300
    )


def test_plan_only_counts_every_kind_of_problem(tmp_path):
    meta = tmp_path / "meta.jsonl"
    good = {"video_id": "v0", "clip": [{"clip_id": "v0.0", "span": ["00:00:00.000", "00:00:02.000"]}]}
    lines = [
        json.dumps(good),
        "not json",
        json.dumps({"url": "no video id", "clip": []}),
        json.dumps(
            {
                "video_id": "v1",
                "clip": [
                    {"span": [0, 1]},
                    {"clip_id": "v1.0", "span": [2, 1]},
                    {"clip_id": "v1.1", "span": ["x", 1]},
                    {"clip_id": "v1.2", "span": [-1, 1]},
                    {"clip_id": "v1.3", "span": [1, 1]},
                ],
            }
        ),
        json.dumps({"video_id": "../v2", "clip": [{"clip_id": "v2.0", "span": [0, 1]}]}),
        json.dumps({"video_id": "v3", "clip": [{"clip_id": "v0.0", "span": [0, 1]}]}),
    ]
    meta.write_bytes("\n".join(lines).encode() + b"\n" + b'{"video_id": "v4\xff", "clip": []}\n')
    subs = tmp_path / "subs.jsonl"
    subs.write_text('{"clip_id": "v0.0", "text": "hi"}\n{"clip_id": 3}\n[1\n')
    result = _shard_cli(
        "--metadata",
        str(meta),
        "--videos",
        str(tmp_path),
        "--output",
        str(tmp_path / "out"),
        "--subtitles",
        str(subs),
        "--clips-per-shard",
        "10",
        *("--require-texts", "subtitle", "--max-missing-videos", "1"),  # no captions, no videos: on purpose
        "--plan-only",
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "videos: 5 records; clips: 7 (0.0 hours of video); shards: 1 of up to 10 clips" in text
    for problem in (
        "clip:duplicate_clip_id: 1",
        "clip:span_empty: 1",
        "clip:span_invalid: 1",
        "clip:span_negative: 1",
        "clip:span_reversed: 1",
        "clip:unsafe_id: 1",
        "line:bad_record: 2",
        "line:malformed_json: 1",
        "line:non_utf8: 1",
        "subtitles:bad_record: 1",
        "subtitles:malformed_json: 1",
    ):
        assert problem in text, (problem, text)
    assert "estimate:" in text and not (tmp_path / "out").exists()
    bad = _shard_cli("--metadata", str(tmp_path / "none.jsonl"), "--videos", ".", "--output", "o", "--plan-only")
    assert bad.returncode == 2 and "none.jsonl: not found" in bad.stderr


def test_plan_only_with_fetch_counts_the_downloads_by_route(tmp_path):
    meta = tmp_path / "hdvila_part0.jsonl"
    lines = [
        {"video_id": "yt", "url": "https://www.youtube.com/watch?v=yt", "clip": [{"clip_id": "yt.0", "span": [0, 10]}]},
        {"video_id": "short", "url": "https://youtu.be/short", "clip": [{"clip_id": "s.0", "span": [0, 10]}]},
        {"video_id": "web", "url": "http://example.org/v.mp4", "clip": [{"clip_id": "w.0", "span": [0, 10]}]},
        {"video_id": "s3", "url": "s3://b/v.mp4", "clip": [{"clip_id": "b.0", "span": [0, 10]}]},
        {"video_id": "none", "clip": [{"clip_id": "n.0", "span": [0, 10]}]},
    ]
    meta.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ("--metadata", str(tmp_path / "hdvila_part*.jsonl"), "--fetch", "--output", "o", "--plan-only")
    result = _shard_cli(*args, "--require-texts", "none")  # release-shaped lines: no texts (test_input_checks.py)
    assert result.returncode == 0, result.stderr
    assert "fetch: 4 source videos to download (http(s): 1, no url: 1, s3: 1, youtube: 2)" in result.stdout
    # 50 s of clips: 480p (224 x margin 2 -> 480) at 0.85 Mbit/s, next to 720p at 2 Mbit/s
    downloads = "downloads (the default choice: 480p): at least 0.00531 GB at 0.85 Mbit/s, 0.0 core-hours of decoding; "
    assert downloads + "at 720p: 0.0125 GB at 2 Mbit/s, 0.0 core-hours of decoding" in result.stdout
    given = _shard_cli(*args, "--require-texts", "none", "--fetch-format", "bv", "--short-side", "224")
    assert "downloads (the --fetch-format given, counted as 720p): at least 0.0125 GB at 2 Mbit/s" in given.stdout
    no_videos = _shard_cli("--metadata", str(meta), "--output", "o", "--plan-only")
    assert no_videos.returncode == 2 and "videos must be given" in no_videos.stderr


PEAK_RSS = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from preprocess.config import Layout
from preprocess.plan import plan_shards, read_slice
files = [sys.argv[2]]
for piece in plan_shards(files, 1000, Layout.SOURCE):
    read_slice(files, piece, Layout.SOURCE)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow  # writes and plans 210k clips in two fresh processes: ~10 s
def test_planning_memory_does_not_grow_with_the_corpus(tmp_path):
    """Plan and read every shard of 10k and of 200k clips: the peak RSS grows by less than 50 MB."""
    peaks = {}
    for clips in (10_000, 200_000):
        path = tmp_path / f"meta-{clips}.jsonl"
        with open(path, "w") as f:
            for v in range(clips // 30):
                entries = ",".join(
                    f'{{"clip_id": "v{v}.{k}.mp4", "span": ["00:00:{k:02d}.000", "00:00:{k + 1:02d}.000"]}}'
                    for k in range(30)
                )
                f.write(f'{{"video_id": "v{v}", "url": "https://www.youtube.com/watch?v=v{v}", "clip": [{entries}]}}\n')
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(REPO), str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        peaks[clips] = int(out.stdout.strip()) / 1024  # MiB
    assert peaks[200_000] - peaks[10_000] < 50, peaks
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
