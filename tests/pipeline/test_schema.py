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
