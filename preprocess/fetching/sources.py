"""Where a shard's source videos come from, and getting them ahead of the decoder.

A video of the ``source`` layout is found, in this order: under ``--videos`` (when given), in the
``--keep-sources`` archive (when given), or, with ``--fetch``, downloaded from its metadata line's ``url``
(preprocess/fetching/fetch.py). Each is looked up for this shard alone (one LIST per folder and shard).

:func:`prefetched` gets the videos of the shard's runs in order on a few threads while the caller decodes: at
most ``depth`` videos are on their way while one is being decoded, so a task's scratch holds at most
``depth + 1`` source files (each at most ``max_video_bytes`` when fetched). A file copied or downloaded into
scratch is deleted as soon as its clips are decoded; what a killed task left is removed by the next attempt at
its shard (preprocess/shard_task.py ``_fresh_scratch``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pipeline import storage
from preprocess.failures import Failure
from preprocess.fetching.config import FetchConfig
from preprocess.fetching.fetch import fetch_video

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SourceSettings:
    """Where source videos are looked for and how they are fetched."""

    videos: str | None
    """Folder or s3:// prefix of ``<video_id>.<ext>`` files, looked up first."""
    keep_sources: str | None = None
    """Archive of fetched sources (looked up second; every download is put there)."""
    fetch: FetchConfig | None = None
    """Download what is found nowhere from its ``url``; None: a video found nowhere is ``missing_file``."""


@dataclass(frozen=True)
class LocalVideo:
    """A source video as a local file."""

    path: str
    uri: str
    """Where it came from: its file, archive object or URL (each sample's ``source_uri``)."""
    temporary: bool
    """A copy in scratch, deleted once its clips are decoded."""
    fetched: dict | None = None
    """Downloaded by this task: the stats row of the download (what was chosen, its bytes); else None."""

    def discard(self) -> None:
        if self.temporary:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


class ShardSources:
    """The source of every video of one shard, and the means to get each as a local file."""

    def __init__(self, settings: SourceSettings, urls: dict[str, str | None], scratch: str, gate=None):
        """``urls``: video id -> its metadata ``url`` (None when the line has none), for the shard's videos."""
        self.settings, self.urls, self.scratch, self.gate = settings, urls, scratch, gate
        self.stored: dict[str, str] = {}
        self.archived: dict[str, str] = {}
        if settings.videos:
            self.stored = _by_stem(settings.videos, urls)
        if settings.keep_sources:
            self.archived = _by_stem(settings.keep_sources, set(urls) - set(self.stored))

    def get(self, video_id: str) -> LocalVideo | Failure:
        """The video as a local file (copied or downloaded into scratch when it is not one), or why not."""
        try:
            uri = self.stored.get(video_id) or self.archived.get(video_id)
            if uri is not None:
                return local_video(uri, self.scratch)
            return self._fetch(video_id)
        except storage.StorageNotFound as exc:
            return Failure(stage="open", error="missing_file", message=str(exc))
        except storage.StorageError as exc:
            return Failure(stage="fetch", error="read_error", message=str(exc))

    def _fetch(self, video_id: str) -> LocalVideo | Failure:
        cfg, url = self.settings.fetch, self.urls.get(video_id)
        if cfg is None:
            return Failure(
                stage="open", error="missing_file", message=f"no file {video_id}.<ext> under {self._where()}"
            )
        if not url:
            return Failure(stage="fetch", error="no_url", message=f"video {video_id}: its metadata line has no url")
        got = fetch_video(url, self.scratch, video_id, cfg, self.gate)
        if isinstance(got, Failure):
            return got
        if self.settings.keep_sources:
            name = video_id + os.path.splitext(got.path)[1]
            storage.put_file(got.path, storage.join(self.settings.keep_sources, name))
        return LocalVideo(path=got.path, uri=url, temporary=True, fetched=got.record(video_id))

    def _where(self) -> str:
        return " or ".join(f for f in (self.settings.videos, self.settings.keep_sources) if f) or "(no folder)"


def _by_stem(folder: str, video_ids: Iterable[str]) -> dict[str, str]:
    """video id -> URI of ``<video_id>.<ext>`` under ``folder`` (the first in name order when there are several)."""
    found = storage.children_by_stem(folder, set(video_ids))
    for video_id, files in found.items():
        if len(files) > 1:
            log.warning("video %s: several files (%s); using %s", video_id, [n for n, _ in files], files[0][1])
    return {video_id: files[0][1] for video_id, files in found.items()}


def local_video(uri: str, scratch: str) -> LocalVideo:
    """A local file as it is; a stored object streamed into scratch."""
    if not storage.is_remote(uri):
        path = storage.parse(uri).path
        if not os.path.isfile(path):
            raise storage.StorageNotFound(f"{uri}: no such file")
        return LocalVideo(path=path, uri=uri, temporary=False)
    fd, path = tempfile.mkstemp(prefix=storage.TEMP_PREFIX, suffix=os.path.splitext(uri)[1], dir=scratch)
    try:
        with os.fdopen(fd, "wb") as dst, storage.open_read(uri) as src:
            shutil.copyfileobj(src, dst, storage.READ_CHUNK)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise
    return LocalVideo(path=path, uri=uri, temporary=True)


def prefetched(
    items: Iterable,
    key: Callable[[object], str | None],
    get: Callable[[str], LocalVideo | Failure],
    depth: int,
    before: Callable[[object], None] = lambda _: None,
) -> Iterator[tuple[object, LocalVideo | Failure | None]]:
    """Each item with its video: ``get(key(item))``, run on ``depth`` threads up to ``depth`` items ahead (None for
    an item whose key is None). ``before(item)`` is called before waiting for an item's video. A video handed out
    is discarded when the caller asks for the next item or stops, so at most ``depth + 1`` exist at once."""
    ahead: deque[tuple[object, concurrent.futures.Future | None]] = deque()
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max(1, depth), thread_name_prefix="source") as pool:
        try:
            while True:
                for item in itertools.islice(items, depth + 1 - len(ahead)):
                    video_id = key(item)
                    ahead.append((item, None if video_id is None else pool.submit(get, video_id)))
                if not ahead:
                    return
                item, future = ahead.popleft()
                before(item)
                got = None if future is None else future.result()
                try:
                    yield item, got
                finally:
                    _discard(got)
        finally:
            for _, future in ahead:  # the caller stopped early: drop what was fetched ahead
                if future is not None and not future.cancel():
                    _discard(future.result())


def _discard(got) -> None:
    if isinstance(got, LocalVideo):
        got.discard()
