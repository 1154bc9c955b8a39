"""Per-clip quality scores: their names, and their distribution as fixed-bin histograms that merge.

A sample's scores sit in its JSON (``ClipMeta.scores``, name -> number); a score that was not computed is
absent, never 0 or null. What each score measures and how: preprocess/scoring/ and docs/preprocessing.md
("Quality scores"). The shard writer sums each tar's scores into a :class:`ScoreSummary` kept in the
tar's manifest entry; the manifest merges them into the data set's (pipeline/manifest.py), and
``vidproxy-verify`` and ``--plan-only`` print it with :func:`table`.

The bin edges are fixed, so summaries of any shards add up bin by bin. A value falls in the bin
``[edges[i], edges[i+1])``; the last bin is ``[edges[-1], inf)`` and values below ``edges[0]`` count in the first.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

SCORES: dict[str, str] = {
    "motion": "mean absolute difference of consecutive stored frames, grey thumbnails, 0..1",
    "static": "fraction of consecutive stored frames that barely differ (mean absolute difference < 0.005)",
    "black": "fraction of stored frames that are black (grey mean < 0.06) or blank (each RGB channel's std < 0.02)",
    "cuts": "hard cuts between consecutive stored frames (HSV histogram distance > 0.42)",
    "sim_subtitle": "cosine similarity of the middle frame and the subtitle (open_clip --score-model)",
    "sim_caption": "cosine similarity of the middle frame and the caption (open_clip --score-model)",
}
"""Every score a sample may carry, with what it measures (the thresholds: preprocess/scoring/quality.py)."""

QUALITY = ("motion", "static", "black", "cuts")
"""The scores computed from the decoded frames alone."""
SIMILARITY = ("sim_subtitle", "sim_caption")
"""The scores of the frame-text model, present only where it ran and the text is not empty."""

_FRACTION = (0.0, 0.01, 0.25, 0.5, 0.75, 1.0)
_SIMILARITY = (-1.0, 0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
BIN_EDGES: dict[str, tuple[float, ...]] = {
    "motion": (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
    "static": _FRACTION,
    "black": _FRACTION,
    "cuts": (0, 1, 2, 3, 5, 10),
    "sim_subtitle": _SIMILARITY,
    "sim_caption": _SIMILARITY,
}
"""Lower edges of each score's histogram bins (fractions: the last bin holds exactly 1.0, the first < 0.01)."""


def check_scores(scores: object, where: str) -> dict[str, float | int]:
    """``scores`` as a name -> finite number mapping; ValueError naming ``where`` and the bad entry."""
    if not isinstance(scores, Mapping):
        raise ValueError(f"{where}: scores must be a mapping of name -> number, got {type(scores).__name__}")
    for name, value in scores.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: score name {name!r} is not a non-empty string")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: score {name!r} is {value!r}, not a finite number")
    return dict(scores)


@dataclass(kw_only=True)
class ScoreHistogram:
    """One score over many clips: bin counts, the clips without it, and the sum, min and max of the values."""

    counts: list[int]
    absent: int = 0
    total: float = 0.0
    min: float | None = None
    max: float | None = None

    @classmethod
    def empty(cls, name: str) -> ScoreHistogram:
        return cls(counts=[0] * len(BIN_EDGES[name]))

    @property
    def scored(self) -> int:
        return sum(self.counts)

    def add(self, name: str, value: float | None) -> None:
        if value is None:
            self.absent += 1
            return
        self.counts[max(0, bisect.bisect_right(BIN_EDGES[name], value) - 1)] += 1
        self.total += value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    def merge(self, other: ScoreHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.absent += other.absent
        self.total += other.total
        self.min = _pick(min, self.min, other.min)
        self.max = _pick(max, self.max, other.max)

    def to_dict(self) -> dict:
        return {
            "counts": list(self.counts),
            "absent": self.absent,
            "sum": round(self.total, 6),
            "min": self.min,
            "max": self.max,
        }


def _pick(fn, a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else fn(a, b)


@dataclass(kw_only=True)
class ScoreSummary:
    """Histograms of the scores of a set of clips (a tar, a data set); empty when no clip had any score."""

    scores: dict[str, ScoreHistogram] = field(default_factory=dict)
    clips: int = 0

    def add(self, scores: Mapping[str, float | int]) -> None:
        """One clip. A score it lacks counts as absent; a name outside ``SCORES`` is ignored."""
        self.clips += 1
        for name in SCORES:
            value = scores.get(name)
            if value is None and name not in self.scores:
                continue
            if name not in self.scores:
                self.scores[name] = ScoreHistogram.empty(name)
                self.scores[name].absent = self.clips - 1
            self.scores[name].add(name, value)

    def merge(self, other: ScoreSummary) -> None:
        for name in SCORES:
            if name in self.scores or name in other.scores:
                mine = self.scores.setdefault(name, _absent(name, self.clips))
                mine.merge(other.scores.get(name) or _absent(name, other.clips))
        self.clips += other.clips

    def to_dict(self) -> dict:
        """``{name: histogram}`` of the scores some clip had; empty when none had any."""
        return {name: self.scores[name].to_dict() for name in SCORES if name in self.scores}

    @classmethod
    def from_dict(cls, data: Mapping, clips: int, where: str) -> ScoreSummary:
        """The summary of ``clips`` clips from :meth:`to_dict`'s form; ValueError naming ``where``."""
        out = cls(clips=clips)
        for name, hist in data.items():
            if name not in SCORES:
                raise ValueError(f"{where}: unknown score {name!r} (known: {', '.join(SCORES)})")
            out.scores[name] = _histogram(hist, f"{where}: score {name!r}")
            counts = out.scores[name].counts
            if len(counts) != len(BIN_EDGES[name]) or sum(counts) + out.scores[name].absent != clips:
                raise ValueError(
                    f"{where}: score {name!r}: {len(counts)} bins and {sum(counts)}+{hist['absent']} clips, "
                    f"expected {len(BIN_EDGES[name])} bins and {clips} clips"
                )
        return out


def _histogram(data: Mapping, where: str) -> ScoreHistogram:
    try:
        return ScoreHistogram(
            counts=[int(c) for c in data["counts"]],
            absent=int(data["absent"]),
            total=float(data["sum"]),
            min=data["min"],
            max=data["max"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad histogram ({type(exc).__name__}: {exc})") from exc


def _absent(name: str, clips: int) -> ScoreHistogram:
    hist = ScoreHistogram.empty(name)
    hist.absent = clips
    return hist


def summarize(all_scores: Iterable[Mapping[str, float | int]]) -> ScoreSummary:
    summary = ScoreSummary()
    for scores in all_scores:
        summary.add(scores)
    return summary


def table(summary: ScoreSummary) -> list[str]:
    """The distribution as a compact text table: per score, how many clips have it, min/mean/max, and the
    histogram as ``lower edge: clips`` per bin."""
    if not summary.scores:
        return [f"scores: none recorded ({summary.clips} clips)"]
    lines = [f"{'score':<13}{'scored':>8}{'absent':>8}{'min':>9}{'mean':>9}{'max':>9}  clips per bin (lower edge: n)"]
    for name in (n for n in SCORES if n in summary.scores):
        hist = summary.scores[name]
        mean = hist.total / hist.scored if hist.scored else None
        bins = "  ".join(f"{_num(e)}: {n}" for e, n in zip(BIN_EDGES[name], hist.counts))
        lines.append(
            f"{name:<13}{hist.scored:>8}{hist.absent:>8}{_num(hist.min):>9}{_num(mean):>9}{_num(hist.max):>9}  {bins}"
        )
    return lines


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if value != int(value) else str(int(value))
