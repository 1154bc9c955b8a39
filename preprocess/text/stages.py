"""Batched model stages inside a shard: generated captions and ASR subtitles, in input order.

:class:`TextStages` sits between the decoder and the shard writer. A sample that needs a
generated text waits in an ordered queue until its stage has ``batch_size`` inputs (or the
shard ends); then the stage's model runs on the batch and the queue is flushed to the writer
in input order. Batches are formed only from the shard's own clips in input order, so a rerun
forms the same batches and writes the same bytes.

A model call that raises :class:`ModelError` (the model failed on its inputs) is retried once
per sample, one at a time; a sample that fails again keeps its clip with the text recorded as
missing, and a failure row (``dropped=False``). Any other exception (a dead model actor, for
instance) propagates, so the shard task fails and is rerun as a whole.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.schema import ClipSample, TextSource
from preprocess.failures import Failure
from preprocess.inputs import ClipItem

log = logging.getLogger(__name__)

ModelFn = Callable[[list], list[str]]
"""A batch of model inputs -> one text per input."""


class ModelError(Exception):
    """A model failed on its inputs (as opposed to the machinery around it failing)."""


def guarded(fn: ModelFn, batch: list) -> list[str]:
    """Call ``fn``; any exception it raises becomes a :class:`ModelError`; checks one text per input."""
    try:
        texts = list(fn(batch))
    except Exception as exc:  # the model's own failure, whatever its type
        raise ModelError(f"{type(exc).__name__}: {exc}") from exc
    if len(texts) != len(batch) or not all(isinstance(t, str) for t in texts):
        raise ModelError(f"the model returned {len(texts)} results for {len(batch)} inputs")
    return texts


def run_with_retry(fn: ModelFn, inputs: Sequence) -> list[str | ModelError]:
    """One call for the batch; if it fails, one call per input. A result is a text or the error."""
    try:
        return list(fn(list(inputs)))
    except ModelError as exc:
        log.warning("model batch of %d failed (%s); retrying each input once", len(inputs), exc)
    out: list[str | ModelError] = []
    for x in inputs:
        try:
            out.append(fn([x])[0])
        except ModelError as exc:
            out.append(exc)
    return out


@dataclass(frozen=True, kw_only=True)
class StageModel:
    """A stage's model as the shard work sees it."""

    fn: ModelFn
    """Inputs (JPEG bytes for captions, 16 kHz float32 arrays for ASR) -> texts; raises ModelError."""
    origin: str
    """Recorded as ``TextSource.origin`` of every text it makes (the model path)."""
    batch_size: int


@dataclass
class _Entry:
    item: ClipItem
    outcome: ClipSample | Failure
    waits: int = 0


@dataclass
class _Stage:
    name: str
    """``caption`` or ``subtitle``: the sample field it fills."""
    model: StageModel
    entries: list[_Entry] = field(default_factory=list)
    inputs: list = field(default_factory=list)


class TextStages:
    """Fill missing captions / subtitles of a shard's samples, batched, keeping the input order."""

    def __init__(
        self,
        emit: Callable[[ClipItem, ClipSample | Failure], None],
        note: Callable[[ClipItem, Failure | str], None],
        caption: StageModel | None = None,
        asr: StageModel | None = None,
    ):
        """``emit`` gets every outcome in input order; ``note`` gets text-stage failures and counters."""
        self.emit, self.note = emit, note
        self.caption = _Stage("caption", caption) if caption else None
        self.asr = _Stage("subtitle", asr) if asr else None
        self.queue: deque[_Entry] = deque()

    def add(self, item: ClipItem, outcome: ClipSample | Failure, audio=None) -> None:
        entry = _Entry(item=item, outcome=outcome)
        self.queue.append(entry)
        if isinstance(outcome, ClipSample):
            meta = outcome.meta
            if self.caption and meta.caption_source.kind == "missing":
                self._wait(self.caption, entry, outcome.frames[meta.middle_frame])
            if self.asr and meta.subtitle_source.kind == "missing":
                if audio is None or len(audio) == 0:
                    self.note(item, "subtitle_no_audio")
                else:
                    self._wait(self.asr, entry, audio)
        self._flush()

    def finish(self) -> None:
        """Run what is left in every stage and emit everything."""
        for stage in (self.caption, self.asr):
            if stage and stage.entries:
                self._run(stage)
        self._flush()

    def _wait(self, stage: _Stage, entry: _Entry, model_input) -> None:
        entry.waits += 1
        stage.entries.append(entry)
        stage.inputs.append(model_input)
        if len(stage.entries) >= stage.model.batch_size:
            self._run(stage)

    def _run(self, stage: _Stage) -> None:
        entries, inputs = stage.entries, stage.inputs
        stage.entries, stage.inputs = [], []
        results = run_with_retry(stage.model.fn, inputs)
        for entry, result in zip(entries, results):
            entry.waits -= 1
            if isinstance(result, ModelError):
                self.note(entry.item, _failure(entry.item, stage, result))
                continue
            entry.outcome = with_text(
                entry.outcome, stage.name, result, TextSource(kind="generated", origin=stage.model.origin)
            )

    def _flush(self) -> None:
        while self.queue and self.queue[0].waits == 0:
            entry = self.queue.popleft()
            self.emit(entry.item, entry.outcome)


def _failure(item: ClipItem, stage: _Stage, exc: ModelError) -> Failure:
    kind = "caption" if stage.name == "caption" else "asr"
    message = f"{kind} model {stage.model.origin} failed on clip {item.clip_id!r} (batch and alone): {exc}"
    return item.fail(kind, f"{kind}_error", message, dropped=False)


def with_text(sample: ClipSample, name: str, text: str, source: TextSource) -> ClipSample:
    """The sample with its ``caption`` or ``subtitle`` (and its source) replaced."""
    meta = dataclasses.replace(sample.meta, **{f"{name}_source": source})
    return dataclasses.replace(sample, meta=meta, **{name: text})
