"""The sample index (pipeline/sample_index.py): range digests whatever the chunking, and refused bad files."""

from __future__ import annotations

import random

import pytest
import xxhash

from pipeline.layout import index_name
from pipeline.sample_index import RangeHasher, SampleIndex, SampleIndexError


def test_range_digests_do_not_depend_on_how_the_bytes_arrive():
    rng = random.Random(3)
    data = rng.randbytes(5000)
    ends = [0, 0, 700, 701, 3000, 4990]
    want = [xxhash.xxh3_64_hexdigest(data[a:b]) for a, b in zip([0] + ends, ends)]
    for _ in range(20):
        hasher = RangeHasher(ends)
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, 512, 2000])
            hasher.update(data[pos : pos + step])
            pos += step
        assert hasher.digests == want
    late = RangeHasher()  # a writer: a range's bytes may come before its end is known, never after
    pos = 0
    for end, following in zip(ends, ends[1:] + [len(data)]):
        late.expect(end)
        cut = rng.randint(end, following)
        late.update(data[pos:cut])
        pos = cut
    late.update(data[pos:])
    assert late.digests == want
    with pytest.raises(ValueError, match="range end 10 is behind the 5000 bytes"):
        late.expect(10)


def test_index_round_trip_and_names():
    index = SampleIndex(("a", "b"), (0, 1024, 3072), ("0123456789abcdef", "fedcba9876543210"))
    assert SampleIndex.parse(index.to_bytes()) == index
    assert index_name("s3://b/x/shard-000001-000.tar") == "s3://b/x/shard-000001-000.idx.json"


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"not json", "unreadable index"),
        (b"[]", "unreadable index"),
        (b'{"format": "other", "version": 1}', "not a vidproxy.sample-index version 1 file"),
        (b'{"format": "vidproxy.sample-index", "version": 1, "keys": ["a"], "offsets": [0], "xxh3_64": []}', "1 keys"),
        (
            b'{"format": "vidproxy.sample-index", "version": 1, "keys": ["a"], "offsets": [9, 0], '
            b'"xxh3_64": ["0123456789abcdef"]}',
            "not ascending",
        ),
        (
            b'{"format": "vidproxy.sample-index", "version": 1, "keys": ["a"], "offsets": [0, 9], "xxh3_64": ["x"]}',
            "not 16 hex digits",
        ),
    ],
)
def test_bad_index_files_are_refused_with_the_reason(raw, reason):
    with pytest.raises(SampleIndexError, match=reason):
        SampleIndex.parse(raw)
