"""preprocess/fetching/sources.py: videos got ahead of the decoder, at most depth + 1 on disk, none left behind."""

from __future__ import annotations

import os
import threading
import time

import pytest

from preprocess.failures import Failure
from preprocess.fetching.sources import LocalVideo, prefetched
from tests.support.progress import wait_until

HELD_S = 30.0
"""How long a held download waits to be let go before it gives up (a test that never lets it go fails)."""


class Downloads:
    """``get`` writes a file per video into ``folder``, and records the most files seen. With ``held``, a download
    waits until the test lets it go (:meth:`let_go`), so the test decides what happens first."""

    def __init__(self, folder, held: bool = False):
        self.folder, self.most, self.lock = folder, 0, threading.Lock()
        self.started: list[str] = []
        self.held: dict[str, threading.Event] | None = {} if held else None

    def get(self, video_id: str) -> LocalVideo | Failure:
        with self.lock:
            self.started.append(video_id)
        if self.held is not None and not self._gate(video_id).wait(HELD_S):
            return Failure(stage="fetch", error="timeout", message=f"{video_id}: never let go")
        time.sleep(0.01)  # a download takes a moment
        if video_id.startswith("bad"):
            return Failure(stage="fetch", error="http_404", message=f"{video_id}: 404")
        path = os.path.join(self.folder, video_id)
        with open(path, "wb") as f:
            f.write(b"x")
        self.count()
        return LocalVideo(path=path, uri=f"http://host/{video_id}", temporary=True)

    def let_go(self, video_id: str) -> None:
        self._gate(video_id).set()

    def _gate(self, video_id: str) -> threading.Event:
        with self.lock:
            return self.held.setdefault(video_id, threading.Event())

    def count(self) -> int:
        with self.lock:
            self.most = max(self.most, len(os.listdir(self.folder)))
            return self.most


def _holding(folder, count: int):
    return lambda: len(os.listdir(folder)) >= count


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_at_most_depth_plus_one_videos_exist_and_none_is_left(tmp_path, depth):
    downloads = Downloads(tmp_path)
    ids = [f"v{k}" for k in range(8)] + ["bad0", "v8"]
    seen = []
    for i, (video_id, got) in enumerate(prefetched(ids, lambda v: v, downloads.get, depth)):
        # while this one is decoded, the next `depth` arrive: wait for them, then exactly those files exist
        present = sorted(v for v in ids[i : i + depth + 1] if not v.startswith("bad"))
        wait_until(_holding(tmp_path, len(present)), f"{present} on disk")
        assert sorted(os.listdir(tmp_path)) == present
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
    wait_until(lambda: len(downloads.started) == 3, "the download two ahead started")
    stream.close()
    assert os.listdir(tmp_path) == [] and len(downloads.started) == 3


def test_before_is_called_before_waiting_for_each_video(tmp_path):
    downloads = Downloads(tmp_path, held=True)  # a video arrives only once `before` has been called for it
    events = []

    def before(video_id: str) -> None:
        events.append(("wait", video_id))
        downloads.let_go(video_id)

    for video_id, got in prefetched(["v0", "v1"], lambda v: v, downloads.get, 1, before=before):
        assert isinstance(got, LocalVideo), got
        events.append(("got", video_id))
    assert events == [("wait", "v0"), ("got", "v0"), ("wait", "v1"), ("got", "v1")]
