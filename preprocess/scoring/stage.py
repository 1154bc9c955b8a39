"""The frame-text similarity stage of a shard: samples pass through it on their way to the writer, in order.

:class:`SimilarityStage` sits after the text stages (preprocess/text/stages.py), so a generated caption or
transcribed subtitle is scored too. A sample with a non-empty subtitle or caption waits until ``batch_size``
samples wait (or the shard ends); then the model scores the batch and the queue is flushed to the writer in
input order. Batches come from the shard's own samples in input order, so a rerun forms the same batches.

A model call that raises :class:`preprocess.text.stages.ModelError` is retried once per sample; a sample that
fails again keeps its clip without the similarity scores (absent) and gets a failure row (``dropped=False``).
Any other exception propagates, so the shard task fails and is rerun as a whole.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.schema import ClipSample
from pipeline.scores import SIMILARITY
from preprocess.failures import Failure
from preprocess.inputs import ClipItem
from preprocess.scoring.similarity import ScorePair
from preprocess.text.stages import ModelError, StageModel, run_with_retry


@dataclass
class _Entry:
    item: ClipItem
    outcome: ClipSample | Failure
    waits: bool = False


class SimilarityStage:
    """Add ``sim_subtitle`` / ``sim_caption`` to the samples that have those texts, batched, keeping the order."""

    def __init__(
        self,
        emit: Callable[[ClipItem, ClipSample | Failure], None],
        note: Callable[[ClipItem, Failure], None],
        model: StageModel,
    ):
        """``emit`` gets every outcome in input order; ``note`` gets the model's failures (the clip is kept)."""
        self.emit, self.note, self.model = emit, note, model
        self.queue: deque[_Entry] = deque()
        self.waiting: list[_Entry] = []

    def add(self, item: ClipItem, outcome: ClipSample | Failure) -> None:
        entry = _Entry(item=item, outcome=outcome)
        self.queue.append(entry)
        if isinstance(outcome, ClipSample) and (outcome.subtitle.strip() or outcome.caption.strip()):
            entry.waits = True
            self.waiting.append(entry)
            if len(self.waiting) >= self.model.batch_size:
                self._run()
        self._flush()

    def finish(self) -> None:
        """Score what waits and emit everything."""
        if self.waiting:
            self._run()
        self._flush()

    def _run(self) -> None:
        entries, self.waiting = self.waiting, []
        inputs = [_model_input(e.outcome) for e in entries]
        for entry, result in zip(entries, run_with_retry(self.model.fn, inputs)):
            entry.waits = False
            if isinstance(result, ModelError):
                self.note(entry.item, _failure(entry.item, self.model.origin, result))
            else:
                entry.outcome = with_similarity(entry.outcome, result)

    def _flush(self) -> None:
        while self.queue and not self.queue[0].waits:
            entry = self.queue.popleft()
            self.emit(entry.item, entry.outcome)


def _model_input(sample: ClipSample) -> tuple[bytes, str, str]:
    return sample.frames[sample.meta.middle_frame], sample.subtitle, sample.caption


def with_similarity(sample: ClipSample, pair: ScorePair) -> ClipSample:
    """The sample with the similarities that are not None added to its scores."""
    scores = dict(sample.meta.scores)
    scores.update({name: value for name, value in zip(SIMILARITY, pair) if value is not None})
    return dataclasses.replace(sample, meta=dataclasses.replace(sample.meta, scores=scores))


def _failure(item: ClipItem, origin: str, exc: ModelError) -> Failure:
    message = f"score model {origin} failed on clip {item.clip_id!r} (batch and alone): {exc}"
    return item.fail("score", "score_error", message, dropped=False)
