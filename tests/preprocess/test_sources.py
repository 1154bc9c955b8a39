"""preprocess/fetching/sources.py: videos got ahead of the decoder, at most depth + 1 on disk, none left behind."""

from __future__ import annotations

import os
import threading
import time

import pytest

from preprocess.failures import Failure
from preprocess.fetching.sources import LocalVideo, prefetched


class Downloads:
    """``get`` writes a file per video into ``folder`` after a short wait, and records the most files seen."""

    def __init__(self, folder, seconds: float = 0.02):
        self.folder, self.seconds, self.most, self.lock = folder, seconds, 0, threading.Lock()
        self.started: list[str] = []

    def get(self, video_id: str) -> LocalVideo | Failure:
        with self.lock:
            self.started.append(video_id)
        time.sleep(self.seconds)
        if video_id.startswith("bad"):
            return Failure(stage="fetch", error="http_404", message=f"{video_id}: 404")
        path = os.path.join(self.folder, video_id)
        with open(path, "wb") as f:
            f.write(b"x")
        self.count()
        return LocalVideo(path=path, uri=f"http://host/{video_id}", temporary=True)

    def count(self) -> int:
        with self.lock:
            self.most = max(self.most, len(os.listdir(self.folder)))
            return self.most


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_at_most_depth_plus_one_videos_exist_and_none_is_left(tmp_path, depth):
    downloads = Downloads(tmp_path)
    ids = [f"v{k}" for k in range(8)] + ["bad0", "v8"]
    seen = []
    for video_id, got in prefetched(ids, lambda v: v, downloads.get, depth):
        time.sleep(0.03)  # decoding: the downloads ahead finish meanwhile
        downloads.count()
        if video_id.startswith("bad"):
            assert isinstance(got, Failure) and got.error == "http_404"
        else:
            assert isinstance(got, LocalVideo) and os.path.exists(got.path)
        seen.append(video_id)
    assert seen == ids
    assert downloads.most == depth + 1
    assert os.listdir(tmp_path) == []


def test_items_without_a_key_get_nothing_and_keep_their_place(tmp_path):
    downloads = Downloads(tmp_path)
    items = ["v0", "skip", "v1"]
    got = [(item, video) for item, video in prefetched(items, lambda v: None if v == "skip" else v, downloads.get, 1)]
    assert [item for item, _ in got] == items and got[1][1] is None
    assert downloads.started == ["v0", "v1"]


def test_stopping_early_discards_what_was_fetched_ahead(tmp_path):
    downloads = Downloads(tmp_path)
    stream = prefetched([f"v{k}" for k in range(6)], lambda v: v, downloads.get, 2)
    next(stream)
    stream.close()
    assert os.listdir(tmp_path) == [] and len(downloads.started) == 3


def test_before_is_called_before_waiting_for_each_video(tmp_path):
    downloads = Downloads(tmp_path, seconds=0.2)
    events = []
    stream = prefetched(["v0", "v1"], lambda v: v, downloads.get, 1, before=lambda v: events.append(("wait", v)))
    for video_id, _ in stream:
        events.append(("got", video_id))
    assert events == [("wait", "v0"), ("got", "v0"), ("wait", "v1"), ("got", "v1")]
