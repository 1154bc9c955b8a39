"""Which texts the configured loss reads, and whether the training data has them.

A manifest records per shard how many samples have a non-empty subtitle and caption (docs/shard-format.md).
Before any rank starts (train/main.py), every ``data.train`` source whose coverage of a text that a term of
``model.loss`` reads is under ``data.min_text_coverage`` stops the run with one line naming the source, the text
and the terms. A source without recorded coverage (no manifest entry, or a manifest written before coverage was
recorded) is not checked; train/shard_sources.py says so once. Texts that are present but empty are still fed
to the loss as the empty string; the validation pass counts them on the held-out clips (train/loop.py).
"""

from __future__ import annotations

from pipeline.manifest import TEXT_FIELDS
from train.config import TrainConfig
from train.loss import JOINT_TERMS, PAIR_TERMS, VARIANT_TERMS
from train.shard_sources import Source, open_sources


def term_texts(variant: str, train_text: str = "subtitle") -> dict[str, tuple[str, ...]]:
    """Text -> the terms of ``variant`` that read it (the joint terms read both texts; infonce's ``text`` is
    ``train_text``), in the variant's order."""
    out: dict[str, list[str]] = {}
    for term in VARIANT_TERMS[variant]:
        features = TEXT_FIELDS if term in JOINT_TERMS else PAIR_TERMS[term]
        for name in features:
            name = train_text if name == "text" else name
            if name in TEXT_FIELDS:
                out.setdefault(name, []).append(term)
    return {name: tuple(out[name]) for name in TEXT_FIELDS if name in out}


def coverage_problem(source: Source, variant: str, train_text: str, minimum: float) -> str | None:
    """One line when ``source`` has fewer clips with a text the loss reads than ``minimum``; None otherwise."""
    coverage = source.text_coverage
    if coverage is None:
        return None
    for name, terms in term_texts(variant, train_text).items():
        if coverage[name] < minimum:
            flags = "--subtitles or --asr-model" if name == "subtitle" else "--captions or --caption-model"
            return (
                f"data.train {source.location}: {100 * coverage[name]:.1f}% of its clips have a {name} (its "
                f"manifest), under data.min_text_coverage {minimum:g}; model.loss {variant} reads the {name} in "
                f"{', '.join(terms)}: preprocess it with {flags}, choose another model.loss, or lower "
                "data.min_text_coverage"
            )
    return None


def check_text_coverage(sources: list[Source], variant: str, train_text: str, minimum: float) -> None:
    """ValueError (one line) on the first source under ``minimum`` for a text the loss reads."""
    if minimum <= 0:
        return
    for source in sources:
        problem = coverage_problem(source, variant, train_text, minimum)
        if problem:
            raise ValueError(problem)


def check_train_texts(cfg: TrainConfig) -> None:
    """The check on ``data.train`` as configured (its manifests are read once more; cheap)."""
    if cfg.data.min_text_coverage <= 0 or not cfg.data.train:
        return
    sources = open_sources(cfg.data.train, "data.train", log_warnings=False)
    check_text_coverage(sources, cfg.model.loss, cfg.data.train_text, cfg.data.min_text_coverage)
