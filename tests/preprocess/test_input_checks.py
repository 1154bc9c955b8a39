"""Texts and source videos are never silently missing (preprocess/input_checks.py): ``--plan-only`` says where each
text comes from and how many clips will have one, counts the videos in one listing of their folder (local and
S3), and it and the job stop with one line when a required text has no source or too many videos are absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.input_checks import DEFAULT_LOSS_TERMS
from preprocess.plan_report import ClipSample
from tests.preprocess.fixtures_job import REPO, ray_local, write_jsonl  # noqa: F401

PROG = "preprocess/shard.py: error: "
BOTH_UNSOURCED = (
    "subtitle and caption have no source (no file, no inline text in the metadata, no model stage), and training's "
    "default loss d reads them (terms s2v, v2s_joint, v2c_joint, c2v, f2c, c2f): give --subtitles FILE or "
    "--asr-model DIR and --captions FILE or --caption-model DIR, or --require-texts none to shard without them on "
    "purpose"
)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "preprocess/shard.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def _release_lines(path: Path, videos: int = 3) -> Path:
    """Lines shaped like the HD-VILA release: a YouTube URL and clip spans, no text."""
    write_jsonl(
        path,
        [
            {
                "video_id": f"yt{v}",
                "url": f"https://www.youtube.com/watch?v=yt{v}",
                "clip": [{"clip_id": f"yt{v}.{k}", "span": [f"00:00:0{k}.000", f"00:00:0{k + 1}.000"]} for k in (0, 1)],
            }
            for v in range(videos)
        ],
    )
    return path


def test_the_default_loss_terms_are_those_train_reads():
    from train.text_coverage import term_texts

    assert DEFAULT_LOSS_TERMS == term_texts("d")


def test_release_lines_without_texts_stop_the_plan_and_the_job(tmp_path):
    meta = _release_lines(tmp_path / "hdvila_part0.jsonl")
    base = ("--metadata", str(meta), "--fetch", "--output", str(tmp_path / "out"))
    plan = _cli(*base, "--plan-only")
    assert plan.returncode == 2, plan.stderr
    assert "subtitle texts: none [required]" in plan.stdout and "caption texts: none [required]" in plan.stdout
    assert plan.stderr.strip().splitlines() == [PROG + BOTH_UNSOURCED]
    job = _cli(*base, "--no-progress")  # refused before any work: no Ray, nothing written
    assert job.returncode == 2 and job.stderr.strip().splitlines()[-1] == PROG + BOTH_UNSOURCED, job.stderr
    assert not (tmp_path / "out").exists()
    subtitle_only = _cli(*base, "--plan-only", "--require-texts", "subtitle")
    assert subtitle_only.returncode == 2 and subtitle_only.stderr.strip() == (
        PROG + "subtitle has no source (no file, no inline text in the metadata, no model stage), and training's "
        "default loss d reads it (terms s2v, v2s_joint, v2c_joint): give --subtitles FILE or --asr-model DIR, or "
        "--require-texts none to shard without it on purpose"
    )
    on_purpose = _cli(*base, "--plan-only", "--require-texts", "none")
    assert on_purpose.returncode == 0 and on_purpose.stderr == "", on_purpose.stderr
    assert "subtitle texts: none [not required (--require-texts)]" in on_purpose.stdout
    with_models = _cli(*base, "--plan-only", "--asr-model", "asr", "--caption-model", "cap")
    assert with_models.returncode == 0, with_models.stderr
    assert "subtitle texts: ASR stage (--asr-model asr) for every clip without a given subtitle [required]" in (
        with_models.stdout
    )
    assert "caption texts: caption stage (--caption-model cap) for every clip without a given caption [required]" in (
        with_models.stdout
    )
    bad = _cli(*base, "--plan-only", "--require-texts", "subtitle,transcript")
    assert bad.returncode == 2 and "require_texts must be a subset of subtitle,caption, or none" in bad.stderr


def test_plan_says_where_each_text_comes_from_and_its_coverage(tmp_path):
    """Inline subtitles on 1 of 4 clips (an empty one does not count) and a caption file that covers 2 of them
    (plus an unknown id and an empty caption): exact shares."""
    clips = [{"clip_id": f"c{k}", "span": [k, k + 1]} for k in range(4)]
    clips[0]["subtitle"], clips[1]["subtitle"] = "hello there", ""
    write_jsonl(tmp_path / "meta.jsonl", [{"video_id": "v", "clip": clips}])
    write_jsonl(
        tmp_path / "caps.jsonl",
        [{"clip_id": "c0", "caption": "a"}, {"clip_id": "c2", "caption": "b"}, {"clip_id": "c3", "caption": ""}]
        + [{"clip_id": "elsewhere", "caption": "c"}],
    )
    args = ["--metadata", str(tmp_path / "meta.jsonl"), "--videos", str(tmp_path), "--output", str(tmp_path / "o")]
    args += ["--captions", str(tmp_path / "caps.jsonl"), "--max-missing-videos", "1", "--plan-only"]
    plan = _cli(*args)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert "subtitle texts: inline in the metadata, 1 (25.0%) of the clips to decode [required]" in lines
    assert (
        f"caption texts: file jsonl {tmp_path}/caps.jsonl, 4 records (joined before the shard tasks; duplicates are "
        "found by the join): 50.0% of the clips to decode have one [required]"
    ) in lines


def test_a_file_share_past_the_cap_is_estimated_on_an_even_sample():
    sample = ClipSample(cap=500)
    for k in range(20_000):
        sample.add(f"clip-{k}")
    assert sample.level > 0 and 0 < len(sample.ids) <= 500
    half = sum(int(i.split("-")[1]) % 2 == 0 for i in sample.ids)  # a file that covers the even clips
    assert abs(half / len(sample.ids) - 0.5) < 0.1
    assert sample.coverage(half).startswith("~") and f"(estimated on {len(sample.ids)} of them)" in sample.coverage(0)
    exact = ClipSample(cap=500)
    for k in range(4):
        exact.add(f"c{k}")
    assert exact.coverage(3) == "75.0% of the clips to decode have one"


def _source_corpus(root: Path, present: tuple[int, ...], videos: int = 5) -> tuple[Path, Path]:
    """``videos`` metadata records (1 clip each; one more whose only clip has a bad span, so it needs no video)
    and a folder with the files of ``present`` (plan-only opens none, so they are empty)."""
    folder = root / "videos"
    folder.mkdir()
    for v in present:
        (folder / f"v{v}.mp4").write_bytes(b"")
    lines = [{"video_id": f"v{v}", "clip": [{"clip_id": f"v{v}.0", "span": [0, 1]}]} for v in range(videos)]
    lines.append({"video_id": "ruled_out", "clip": [{"clip_id": "r.0", "span": [2, 1]}]})
    write_jsonl(root / "meta.jsonl", lines)
    return root / "meta.jsonl", folder


def test_absent_videos_are_counted_and_stop_the_plan(tmp_path):
    meta, folder = _source_corpus(tmp_path, present=(0, 2, 4))
    args = (
        "--metadata",
        str(meta),
        "--videos",
        str(folder),
        "--output",
        str(tmp_path / "o"),
        "--require-texts",
        "none",
    )
    plan = _cli(*args, "--plan-only")
    assert plan.returncode == 2
    assert f"video files: 3 of 5 found under {folder}; 2 missing (first: v1, v3)" in plan.stdout.splitlines()
    assert plan.stderr.strip() == (
        f"{PROG}videos {folder}: 2 of 5 videos are not there (40.0%, over --max-missing-videos 0.01), e.g. v1.<ext>: "
        "check --videos and --layout, or raise --max-missing-videos"
    )
    job = _cli(*args, "--no-progress")
    assert job.returncode == 2 and job.stderr.strip().splitlines()[-1] == plan.stderr.strip()
    assert not (tmp_path / "o").exists()
    assert _cli(*args, "--plan-only", "--max-missing-videos", "0.4").returncode == 0
    fetching = _cli(*args, "--plan-only", "--fetch")
    assert fetching.returncode == 0, fetching.stderr
    assert f"video files: 3 of 5 found under {folder}; 2 to fetch (first: v1, v3)" in fetching.stdout


def test_an_empty_videos_folder_is_no_longer_problems_none(tmp_path):
    """The case of the issue: every video absent used to plan as ``problems: none``."""
    meta, folder = _source_corpus(tmp_path, present=())
    args = ("--metadata", str(meta), "--videos", str(folder), "--output", "o", "--require-texts", "none")
    plan = _cli(*args, "--plan-only")
    assert plan.returncode == 2 and "5 of 5 videos are not there (100.0%" in plan.stderr
    assert "video files: 0 of 5 found" in plan.stdout


def test_clips_layout_checks_each_clip_file(tmp_path):
    """Pre-cut clips: each clip entry's file ``<video_id>/<clip_id>``, from one recursive listing."""
    folder = tmp_path / "clips"
    (folder / "v0").mkdir(parents=True)
    for name in ("v0/v0.0.mp4", "v0/sub/v0.1.mp4"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    clips = [{"clip_id": "v0.0.mp4", "span": [0, 1]}, {"clip_id": "sub/v0.1.mp4", "span": [1, 2]}]
    lines = [{"video_id": "v0", "clip": clips}, {"video_id": "v1", "clip": [{"clip_id": "v1.0.mp4", "span": [0, 1]}]}]
    write_jsonl(tmp_path / "meta.jsonl", lines)
    args = ("--metadata", str(tmp_path / "meta.jsonl"), "--videos", str(folder), "--layout", "clips")
    plan = _cli(*args, "--output", "o", "--require-texts", "none", "--plan-only")
    assert f"clip files: 2 of 3 found under {folder}; 1 missing (first: v1/v1.0.mp4)" in plan.stdout.splitlines()
    assert plan.returncode == 2 and "1 of 3 clip files are not there (33.3%" in plan.stderr
    assert "e.g. v1/v1.0.mp4: check" in plan.stderr


def _list_calls():
    """Counts this process's S3 ListObjectsV2 calls (pipeline/storage.py's own client) within the block."""
    from pipeline import storage

    calls = []
    return calls, storage.s3_hook("before-call.s3.ListObjectsV2", lambda **_: calls.append(1))


@pytest.mark.slow  # 1,200 objects put one by one to the S3 server: ~13 s
def test_an_s3_videos_prefix_is_listed_once_not_per_video(s3_server, s3_bucket, tmp_path):
    """1,200 videos planned, 1,199 on S3 (and a file under another prefix): the plan and the job's start check each
    list the prefix in 2 requests (1,000 names per page), not 1,200."""
    from preprocess.job import run_job
    from preprocess.plan_report import plan_report
    from preprocess.shard import build_config, build_parser

    bucket, videos = s3_bucket.removeprefix("s3://"), 1_200
    client = s3_server.client()
    for v in range(1, videos):
        client.put_object(Bucket=bucket, Key=f"videos/v{v:04d}.mp4", Body=b"")
    client.put_object(Bucket=bucket, Key="elsewhere/v0000.mp4", Body=b"")
    write_jsonl(
        tmp_path / "meta.jsonl",
        [{"video_id": f"v{v:04d}", "clip": [{"clip_id": f"v{v:04d}.0", "span": [0, 1]}]} for v in range(videos)],
    )
    args = ["--metadata", str(tmp_path / "meta.jsonl"), "--videos", f"{s3_bucket}/videos/", "--require-texts", "none"]
    args += ["--output", str(tmp_path / "out"), "--no-progress"]
    cfg = build_config(build_parser().parse_args([*args, "--plan-only"]))
    calls, hook = _list_calls()
    with hook:
        report = plan_report(cfg)
    assert len(calls) == 2
    assert report.found_videos == f"video files: 1199 of 1200 found under {s3_bucket}/videos/; 1 missing (first: v0000)"
    assert report.refusals == []  # 1 of 1,200 is under 1%
    strict = build_config(build_parser().parse_args([*args, "--max-missing-videos", "0"]))
    calls, hook = _list_calls()
    with hook, pytest.raises(ValueError, match=r"^videos s3://.*/videos/: 1 of 1200 videos are not there \(0\.1%"):
        run_job(strict)
    assert len(calls) == 2 and not (tmp_path / "out").exists()


@pytest.mark.ray
def test_inline_texts_pass_the_job_and_the_manifest_records_the_coverage(ray_local, tmp_path):
    """No subtitle file, but the first shard's clips carry inline subtitles: the job runs; the manifest counts the
    samples with a non-empty subtitle (2 of 4) and caption (3 of 4: the file covers three clips)."""
    from pipeline.manifest import read_manifest
    from preprocess.job import run_job
    from tests.preprocess.fixtures_job import config, make_corpus

    corpus = make_corpus(tmp_path / "corpus", videos=2, clips=2)
    lines = [json.loads(line) for line in corpus["metadata"].read_text().splitlines()]
    inline = {"vid00.0.mp4": "hello", "vid00.1.mp4": "", "vid01.1.mp4": "world"}
    for line in lines:
        for clip in line["clip"]:
            if clip["clip_id"] in inline:
                clip["subtitle"] = inline[clip["clip_id"]]
    write_jsonl(corpus["metadata"], lines)
    captions = corpus["captions"].read_text().splitlines()
    corpus["captions"].write_text("\n".join(captions[:3]) + "\n")
    result = run_job(config({**corpus, "subtitles": None}, tmp_path / "out"))
    assert result.manifest and result.ok == 4, result.summary()
    assert result.videos == f"video files: 2 of 2 found under {corpus['videos']}"
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.texts == {"subtitle": 2, "caption": 3}
    assert manifest.text_coverage() == {"subtitle": 0.5, "caption": 0.75}
    assert [e.texts for e in manifest.shards] == [{"subtitle": 1, "caption": 3}, {"subtitle": 1, "caption": 0}]
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert raw["totals"]["texts"] == {"subtitle": 2, "caption": 3}


def _unmatched(path: Path, records: str) -> str:
    return (
        f"captions {path}: {records} gives a planned clip a caption (are its clip ids those of the metadata, and its "
        "text field the one docs/preprocessing.md names?), and training's default loss d reads it (terms c2v, "
        "v2s_joint, v2c_joint, f2c, c2f): fix the file, add --caption-model DIR, or --require-texts subtitle to "
        "shard without it on purpose"
    )


def test_a_caption_file_that_matches_no_planned_clip_stops_the_plan(tmp_path):
    """Release lines with a subtitle file that fits and a caption file whose ids are another data set's: a source
    in name only. Not required, or filled in by a caption stage, it passes."""
    meta = _release_lines(tmp_path / "hdvila_part0.jsonl")
    write_jsonl(tmp_path / "subs.jsonl", [{"clip_id": "yt0.0", "text": "hello"}])
    write_jsonl(tmp_path / "caps.jsonl", [{"clip_id": f"msrvtt{k}", "caption": "a dog"} for k in range(3)])
    base = ["--metadata", str(meta), "--fetch", "--output", str(tmp_path / "out"), "--plan-only"]
    base += ["--subtitles", str(tmp_path / "subs.jsonl"), "--captions", str(tmp_path / "caps.jsonl")]
    plan = _cli(*base)
    assert plan.returncode == 2
    assert plan.stderr.strip().splitlines() == [PROG + _unmatched(tmp_path / "caps.jsonl", "none of its 3 records")]
    assert "0.0% of the clips to decode have one [required]" in plan.stdout
    assert _cli(*base, "--require-texts", "subtitle").returncode == 0
    assert _cli(*base, "--caption-model", "cap").returncode == 0


@pytest.mark.ray
def test_the_job_stops_after_the_join_when_a_required_file_gave_no_clip_a_text(ray_local, tmp_path):
    """The same in the job: the join finds no caption for any clip, and the job stops before any shard task."""
    from preprocess.job import run_job
    from tests.preprocess.fixtures_job import config, make_corpus

    corpus = make_corpus(tmp_path / "corpus", videos=2, clips=2)
    write_jsonl(corpus["captions"], [{"clip_id": "another-data-set.mp4", "caption": "a dog"}])
    with pytest.raises(ValueError) as refused:
        run_job(config(corpus, tmp_path / "out"))
    assert str(refused.value) == _unmatched(corpus["captions"], "none of its entries")
    assert not list((tmp_path / "out").glob("shard-*.tar"))


def test_a_required_text_most_samples_lack_is_a_warning_in_the_job_summary():
    """An LMDB or an ASR stage can match few clips without any check before the job: its summary says so."""
    from pipeline.manifest import ShardEntry
    from preprocess.job import JobResult, _tally
    from preprocess.shard_task import ShardStats

    entry = ShardEntry(url="shard-000000-000.tar", samples=4, bytes=1, sha256="0" * 64, seconds=4.0)
    entry.texts.update(subtitle=4, caption=1)
    result = JobResult(required_texts=("subtitle", "caption"))
    _tally(result, {0: ShardStats(shard=0, ok=4, entries=[entry])})
    warnings = [line for line in result.summary().splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: caption: 1 of 4 samples have one (required by --require-texts; training refuses a loss term whose "
        "text is under data.min_text_coverage, 0.5 by default)"
    ]
    assert "warning" not in JobResult(required_texts=("subtitle",), ok=4, with_text={"subtitle": 2}).summary()
