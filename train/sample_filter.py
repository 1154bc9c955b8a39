"""``data.filter``: a small expression over a sample's quality scores, checked before its frames are decoded.

    data.filter="motion > 0.01 and cuts == 0"
    data.filter="not (black > 0.5) and (sim_caption >= 0.2 or sim_subtitle >= 0.2)"

The grammar is a safe subset of Python's, parsed with :mod:`ast` and built into plain closures (nothing is
``eval``-ed): score names (pipeline/scores.py), numbers (a leading ``-`` allowed), the comparisons
``< <= > >= == !=`` (chains too: ``0.01 < motion < 0.2``), ``and``, ``or``, ``not`` and parentheses. Anything else,
an unknown name or bad syntax is a ValueError with one line naming ``data.filter`` and the reason.

A sample that lacks a score the expression names (data made before the scores, a similarity without a text or
without a score model) is left out, whatever the expression: a filter keeps what it can show passes. The
loader counts what the filter leaves out (``data/filtered`` in the metrics; train/loader.py) and refuses at
start a data set whose manifest shows no clip with such a score.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable, Mapping

from pipeline.manifest import ShardEntry
from pipeline.scores import SCORES, ScoreSummary

Scores = Mapping[str, float]
_COMPARE: dict[type, Callable[[float, float], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


class SampleFilter:
    """A parsed ``data.filter``: ``keep(scores)`` is True when the sample has every named score and passes."""

    def __init__(self, expression: str):
        self.expression = expression
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as exc:
            why = f"column {exc.offset}: {exc.msg}"
            raise ValueError(f"data.filter: {expression!r} is not an expression ({why})") from None
        self.names: set[str] = set()
        self._test = self._build(tree.body)

    def keep(self, scores: Scores) -> bool:
        return self.names <= scores.keys() and self._test(scores)

    def __reduce__(self):  # the closures do not pickle: a worker started by spawn parses the expression again
        return SampleFilter, (self.expression,)

    def _build(self, node: ast.AST) -> Callable[[Scores], bool]:
        """A test: a comparison, or tests joined by and / or / not."""
        if isinstance(node, ast.BoolOp):
            parts = [self._build(v) for v in node.values]
            combine = all if isinstance(node.op, ast.And) else any
            return lambda s: combine(part(s) for part in parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self._build(node.operand)
            return lambda s: not inner(s)
        if isinstance(node, ast.Compare):
            terms = [self._value(node.left), *(self._value(c) for c in node.comparators)]
            ops = [_COMPARE.get(type(op)) for op in node.ops]
            if None in ops:
                raise self._not_allowed(node)
            return lambda s: all(op(a(s), b(s)) for op, a, b in zip(ops, terms, terms[1:]))
        raise self._not_allowed(node, "a comparison")

    def _value(self, node: ast.AST) -> Callable[[Scores], float]:
        """A term of a comparison: a score name or a number."""
        if isinstance(node, ast.Name):
            return self._name(node.id)
        number = _number(node)
        if number is None:
            raise self._not_allowed(node, "a score name or a number")
        return lambda s: number

    def _not_allowed(self, node: ast.AST, expected: str = "") -> ValueError:
        text = ast.get_source_segment(self.expression.strip(), node)
        where = f" (expected {expected})" if expected else ""
        return ValueError(
            f"data.filter: {text!r} is not allowed{where}: use score names, numbers, comparisons "
            "(< <= > >= == !=), and, or, not and parentheses"
        )

    def _name(self, name: str) -> Callable[[Scores], float]:
        if name not in SCORES:
            raise ValueError(f"data.filter: unknown score {name!r} (known: {', '.join(SCORES)})")
        self.names.add(name)
        return lambda s: s[name]


def _number(node: ast.AST) -> float | None:
    """The value of a number literal, with an optional leading minus; None for anything else."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _number(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    return None


def check_scored(sample_filter: SampleFilter, location: str, entries: Iterable[ShardEntry]) -> None:
    """ValueError when the manifest entries of a data set show no clip with a score the filter names (every
    sample would be left out: data made before the scores, or with them off)."""
    summary = ScoreSummary()
    for entry in entries:
        summary.merge(ScoreSummary.from_dict(entry.scores, entry.samples, entry.url))
    if not summary.clips:
        return
    unscored = sorted(n for n in sample_filter.names if n not in summary.scores or not summary.scores[n].scored)
    if unscored:
        raise ValueError(
            f"data.filter {sample_filter.expression!r}: no clip of {location} has the score(s) {', '.join(unscored)} "
            "(its manifest says so; made before the scores, with them off, or without a score model): every sample "
            "would be left out"
        )
