import json
import tarfile

import pytest

from pipeline.schema import ClipMeta, ClipSample, SchemaError, decode_key, encode_key
from tests.support.samples import make_sample

NASTY_IDS = [
    "dQw4w9WgXcQ.3.mp4",
    "a b c.mp4",
    "../../etc/passwd",
    "sub/dir/clip.1.mp4",
    "vidéo_日本語.0.mp4",
    "..",
    "%41.mp4",
    "-_-",
]


@pytest.mark.parametrize("clip_id", NASTY_IDS)
def test_keys_round_trip_and_are_safe(clip_id):
    key = encode_key(clip_id)
    assert decode_key(key) == clip_id
    assert "/" not in key and "." not in key and " " not in key
    assert key.isascii()


def test_distinct_ids_give_distinct_keys():
    keys = {encode_key(c) for c in NASTY_IDS}
    assert len(keys) == len(NASTY_IDS)


@pytest.mark.parametrize("bad", ["", "a.b", "a/b", "%zz", "%4"])
def test_decode_rejects_non_keys(bad):
    with pytest.raises(SchemaError, match="not an encoded sample key"):
        decode_key(bad)


def test_meta_json_round_trip():
    sample = make_sample("x.1.mp4", num_frames=5)
    assert ClipMeta.from_json(sample.meta.to_json()) == sample.meta


def test_meta_rejects_other_schema_version():
    raw = json.loads(make_sample("x.1.mp4").meta.to_json())
    raw["schema_version"] = 99
    with pytest.raises(SchemaError, match="schema version 99"):
        ClipMeta.from_json(json.dumps(raw))


def test_meta_validation_names_the_clip():
    sample = make_sample("x.1.mp4", num_frames=3)
    with pytest.raises(SchemaError, match="x.1.mp4.*middle_frame"):
        ClipMeta(**{**sample.meta.__dict__, "middle_frame": 3})


def test_members_stay_inside_archive(tmp_path):
    """Written with tarfile and extracted with the stdlib's strict filter: nothing escapes."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for clip_id in NASTY_IDS:
            for name, payload in make_sample(clip_id, num_frames=2).members():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                import io

                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    with tarfile.open(path) as tar:
        tar.extractall(out, filter="data")
    assert all(p.parent == out for p in out.rglob("*"))


def test_sample_requires_one_frame_per_time():
    sample = make_sample("x.mp4", num_frames=3)
    with pytest.raises(SchemaError, match="2 frames but 3"):
        ClipSample(meta=sample.meta, frames=sample.frames[:2])


def _wds(sample: ClipSample) -> dict:
    """A sample dict as the shard reader yields it."""
    key = sample.key
    return {"__key__": key, "__url__": "mem.tar", **{name[len(key) + 1 :]: data for name, data in sample.members()}}


def test_from_wds_orders_frames_and_ignores_other_members():
    sample = make_sample("x.1.mp4", num_frames=12)
    raw = _wds(sample)
    assert ClipSample.from_wds(raw) == sample
    shuffled = {**dict(reversed(list(raw.items()))), "npy": b"\0"}  # member order and unknown members do not matter
    assert ClipSample.from_wds(shuffled).frames == sample.frames


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw.pop("f003.jpg"), "not numbered 0..n-1"),
        (lambda raw: raw.update({"f012.jpg": b"x"}), "13 frames but 12"),
        (lambda raw: raw.update({"f013.jpg": raw.pop("f011.jpg")}), "not numbered 0..n-1"),
        (lambda raw: raw.pop("f011.jpg"), "11 frames but 12"),
    ],
)
def test_from_wds_rejects_missing_extra_or_misnumbered_frames(change, message):
    raw = _wds(make_sample("x.1.mp4", num_frames=12))
    change(raw)
    with pytest.raises(SchemaError, match=message):
        ClipSample.from_wds(raw)


def test_ascii_keys_match_the_byte_wise_encoding():
    every_ascii = "".join(map(chr, range(1, 128)))
    expected = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else f"%{ord(c):02X}" for c in every_ascii)
    assert encode_key(every_ascii) == expected
    assert decode_key(encode_key(every_ascii + "é")) == every_ascii + "é"
