"""Retrieval converters: tiny annotation files in each benchmark's format, real ffmpeg videos, a real Ray job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.shards import iter_dataset
from preprocess.downstream import DATASETS
from preprocess.downstream.__main__ import main as convert_main
from preprocess.downstream.common import AnnotationError
from tests.support.tiers import marks_users

# file stem -> testsrc pattern; MSR-VTT, DiDeMo (Flickr ids), LSMDC (dotted clip ids), ActivityNet (no v_ prefix)
VIDEOS = {
    "video1": "testsrc2",
    "video2": "smptebars",
    "video3": "rgbtestsrc",
    "video4": "testsrc",
    "video5": "yuvtestsrc",
    "1234@N00_56_ab": "testsrc2",
    "777@N01_88_cd": "smptebars",
    "1001_Flight_00.00.45.199-00.00.49.999": "testsrc",
    "1001_Flight_00.01.00.000-00.01.02.500": "rgbtestsrc",
    "QOlSCBRmfWY": "testsrc2",
    "v_abcdefghijk": "smptebars",
}
SMALL = ["--short-side", "32", "--no-progress", "--log-level", "WARNING"]


def _ffmpeg_video(path: Path, pattern: str) -> None:
    ext_args = (
        ["-c:v", "mpeg4", "-q:v", "5"]
        if path.suffix == ".avi"
        else ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    )
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"{pattern}=size=64x48:rate=10",
            "-t",
            "1.5",
            *ext_args,
            str(path),
        ],
        check=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for stem, pattern in VIDEOS.items():
        _ffmpeg_video(folder / f"{stem}{'.avi' if stem.startswith('1001_') else '.mp4'}", pattern)
    return folder


@pytest.fixture(scope="module")
@marks_users("ray")
def ray_local():
    """One real 2-CPU local Ray cluster for the module; the converter's jobs reuse it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write(folder: Path, name: str, content) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1), encoding="utf-8")
    return path


def msrvtt_annotations(folder: Path) -> Path:
    sentences = [
        {"video_id": "video1", "caption": "a man sings on stage", "sen_id": 0},
        {"video_id": "video1", "caption": "someone is\nsinging", "sen_id": 1},
        {"video_id": "video2", "caption": "a cat plays", "sen_id": 2},
        {"video_id": "video2", "caption": "   ", "sen_id": 3},
        {"video_id": "video3", "caption": "a dog runs", "sen_id": 4},
        {"video_id": "video4", "caption": "cars drive", "sen_id": 5},
        {"video_id": "video9", "caption": "this video is missing", "sen_id": 6},
    ]
    write(
        folder,
        "MSRVTT_data.json",
        {"info": {}, "videos": [{"video_id": f"video{i}"} for i in (1, 2, 3, 4, 9)], "sentences": sentences},
    )
    write(folder, "MSRVTT_train.9k.csv", "video_id\nvideo1\nvideo2\nvideo3\nvideo9\n")
    write(
        folder,
        "MSRVTT_JSFUSION_test.csv",
        'key,vid_key,video_id,sentence\nret0,msr4,video4,"cars, driving"\nret1,msr5,video5,a sunny beach\n',
    )
    return folder


def read_split(out: Path, split: str) -> dict:
    return {s.meta.clip_id: s for s in iter_dataset(str(out / split))}


def report(out: Path, split: str) -> dict:
    return json.loads((out / "inputs" / split / "report.json").read_text())


@pytest.mark.ray
def test_msrvtt_json_layout_to_three_data_sets(ray_local, videos, tmp_path):
    ann, out = msrvtt_annotations(tmp_path / "ann"), tmp_path / "out"
    code = convert_main(
        [
            "msrvtt",
            "--annotations",
            str(ann),
            "--videos",
            str(videos),
            "--out",
            str(out),
            "--val-count",
            "1",
            "--frames",
            "4",
            *SMALL,
        ]
    )
    assert code == 0
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 3 and len(val) == 1  # video9 has no file
    everything = {**train, **val}
    assert everything["video1"].subtitle.splitlines() == ["a man sings on stage", "someone is singing"]
    assert everything["video1"].caption == "a man sings on stage"
    assert everything["video2"].subtitle == "a cat plays"
    assert all(len(s.frames) == 8 for s in train.values())  # train stores 2x frames for jitter
    assert all(len(s.frames) == 4 for s in [*val.values(), *test.values()])
    assert test["video4"].subtitle == "cars, driving" and set(test) == {"video4", "video5"}
    assert test["video4"].meta.span[1] == pytest.approx(1.5, abs=0.15)  # the whole video
    rep = {s: report(out, s) for s in ("train", "val")}
    missing = rep["train"]["missing_videos"] + rep["val"]["missing_videos"]
    assert missing == ["video9"]
    empties = rep["train"]["empty_texts"] + rep["val"]["empty_texts"]
    assert len(empties) == 1 and "MSRVTT_data.json line" in empties[0] and empties[0].endswith("video2")
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["splits"]["test"]["frames"] == 4 and summary["splits"]["train"]["manifest"]


@pytest.mark.ray
def test_activitynet_paragraphs_and_32_frames(ray_local, videos, tmp_path):
    ann = tmp_path / "ann"
    train = {
        "v_QOlSCBRmfWY": {
            "duration": 82.7,
            "timestamps": [[0, 10], [10, 20]],
            "sentences": [" A girl plays.", "She then  bows. "],
        },
        "v_missing0000": {"duration": 10.0, "timestamps": [[0, 1]], "sentences": ["gone"]},
    }
    write(ann, "train.json", train)
    write(
        ann,
        "val_1.json",
        {
            "v_abcdefghijk": {
                "duration": 5.0,
                "timestamps": [[0, 5], [1, 2]],
                "sentences": ["Bars appear.", "They stay."],
            }
        },
    )
    out = tmp_path / "out"
    code = convert_main(
        [
            "activitynet",
            "--annotations",
            str(ann),
            "--videos",
            str(videos),
            "--out",
            str(out),
            "--val-count",
            "0",
            "--splits",
            "train,test",
            *SMALL,
        ]
    )
    assert code == 0
    test = read_split(out, "test")["v_abcdefghijk"]
    assert len(test.frames) == 32 and test.meta.video_id == "v_abcdefghijk"
    assert test.subtitle == "Bars appear. They stay." == test.caption  # one paragraph, one line
    trained = read_split(out, "train")["v_QOlSCBRmfWY"]
    assert trained.subtitle == "A girl plays. She then bows." and len(trained.frames) == 64
    assert trained.meta.video_id == "QOlSCBRmfWY"  # file named without the v_ prefix
    assert report(out, "train")["missing_videos"] == ["v_missing0000"]


@pytest.mark.ray
def test_didemo_and_lsmdc_test_splits(ray_local, videos, tmp_path):
    ann = tmp_path / "didemo"
    moments = [
        {"video": "1234@N00_56_ab.mov", "description": "a red light turns on", "times": [[0, 0]]},
        {"video": "777@N01_88_cd.mp4", "description": "bars fill the screen", "times": [[1, 1]]},
        {"video": "1234@N00_56_ab.mov", "description": "then it fades", "times": [[2, 3]]},
    ]
    for split in ("train", "val", "test"):
        write(ann, f"{split}_data.json", moments)
    out = tmp_path / "out-didemo"
    assert (
        convert_main(
            [
                "didemo",
                "--annotations",
                str(ann),
                "--videos",
                str(videos),
                "--out",
                str(out),
                "--splits",
                "test",
                *SMALL,
            ]
        )
        == 0
    )
    test = read_split(out, "test")
    assert test["1234@N00_56_ab"].subtitle == "a red light turns on then it fades"
    assert len(test) == 2 and len(test["777@N01_88_cd"].frames) == 12

    lsmdc = tmp_path / "lsmdc"
    clip_a, clip_b = "1001_Flight_00.00.45.199-00.00.49.999", "1001_Flight_00.01.00.000-00.01.02.500"
    line = "{}\t00.00.45.199\t00.00.49.999\t00.00.45.100\t00.00.50.000\t{}\n"
    for name in ("LSMDC16_annos_training.csv", "LSMDC16_annos_val.csv", "LSMDC16_challenge_1000_publictect.csv"):
        write(
            lsmdc,
            name,
            line.format(clip_a, "SOMEONE lands the plane.")
            + line.format(clip_b, "")
            + line.format("1001_Flight_missing", "Nobody."),
        )
    out = tmp_path / "out-lsmdc"
    assert (
        convert_main(
            [
                "lsmdc",
                "--annotations",
                str(lsmdc),
                "--videos",
                str(videos),
                "--out",
                str(out),
                "--splits",
                "test",
                *SMALL,
            ]
        )
        == 0
    )
    test = read_split(out, "test")
    assert test[clip_a].subtitle == "SOMEONE lands the plane." and test[clip_b].subtitle == ""
    rep = report(out, "test")
    assert rep["missing_videos"] == ["1001_Flight_missing"] and rep["videos_without_text"] == [clip_b]
    assert rep["empty_texts"] == [f"{lsmdc}/LSMDC16_challenge_1000_publictect.csv line 2: {clip_b}"]


def test_msrvtt_jsonl_layout_and_val_hold_out(tmp_path):
    ann = tmp_path / "ann"
    rows = [{"clip_id": f"video{i}", "text": [f"caption {i} a", f"caption {i} b"]} for i in range(20)]
    write(ann, "train9k.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(ann, "test1ka.jsonl", json.dumps({"clip_id": "video7020.mp4", "text": "one sentence"}) + "\n")
    splits = DATASETS["msrvtt"].read_splits(str(ann), 5)
    train_ids = [i.clip_id for i in splits["train"].items]
    val_ids = [i.clip_id for i in splits["val"].items]
    assert len(train_ids) == 15 and len(val_ids) == 5 and not set(train_ids) & set(val_ids)
    assert splits["val"].items == DATASETS["msrvtt"].read_splits(str(ann), 5)["val"].items  # stable
    assert splits["train"].items[0].texts == ("caption 0 a", "caption 0 b") or train_ids[0] != "video0"
    assert splits["test"].items[0].clip_id == "video7020" and splits["test"].items[0].texts == ("one sentence",)


@pytest.mark.parametrize(
    "dataset, files, expected",
    [
        (
            "msrvtt",
            {
                "train9k.jsonl": '{"clip_id": "video1", "text": "ok"}\n{"clip_id": "video2", "text": \n',
                "test1ka.jsonl": "",
            },
            "train9k.jsonl line 2: malformed JSON",
        ),
        (
            "msrvtt",
            {"train9k.jsonl": '{"clip_id": "video1", "txt": "typo"}\n', "test1ka.jsonl": ""},
            "train9k.jsonl line 1 field 'text': missing",
        ),
        (
            "didemo",
            {"train_data.json": '[\n {"video": "a.mp4", "description": "x"},\n {"description": "no video"}\n]'},
            "train_data.json line 3 field 'video'",
        ),
        (
            "lsmdc",
            {"LSMDC16_annos_training.csv": "clip1\t0\t1\t0\t1\tok\nclip2\t0\t1\t0\n"},
            "LSMDC16_annos_training.csv line 2 field 'end_extracted': missing",
        ),
        (
            "activitynet",
            {
                "train.json": '{\n "v_a": {"duration": 3, "sentences": ["x"]},\n "v_b": {"duration": 3}\n}',
                "val_1.json": "{}",
            },
            "train.json line 3 field 'sentences': missing",
        ),
        ("activitynet", {"train.json": "[1, 2]", "val_1.json": "{}"}, "is not a {video_id: {...}} object"),
        ("msrvtt", {"notes.txt": "hello"}, "no MSR-VTT annotations; expected MSRVTT_data.json"),
    ],
)
def test_bad_annotations_name_file_line_and_field(tmp_path, capsys, dataset, files, expected):
    ann = tmp_path / "ann"
    for name, content in files.items():
        write(ann, name, content)
    with pytest.raises(AnnotationError, match=None) as info:
        DATASETS[dataset].read_splits(str(ann), 0)
    assert expected in str(info.value)
    code = convert_main([dataset, "--annotations", str(ann), "--videos", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and expected in capsys.readouterr().err


def test_missing_videos_folder_and_bad_options(tmp_path, capsys):
    ann = msrvtt_annotations(tmp_path / "ann")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["msrvtt", "--annotations", str(ann), "--videos", str(empty), "--out", str(tmp_path / "o")]
    assert convert_main(args) == 2
    assert "val_count=500 would hold out all 4 training videos" in capsys.readouterr().err
    assert convert_main([*args, "--val-count", "1"]) == 2
    assert "no <video_id>.<ext> files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main(["msrvtt", "--annotations", str(ann), "--videos", str(empty), "--out", "o", "--splits", "dev"])
    assert "splits must be a non-empty subset" in capsys.readouterr().err
