"""Which quality scores a preprocessing job computes (docs/preprocessing.md, "Quality scores")."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.scores import QUALITY, SIMILARITY


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """Per-clip quality scores, stored in each sample's JSON and summarised in the manifest."""

    quality: bool = True
    """Compute motion, static, black and cuts from a thumbnail of each stored frame (56x56 of 224x224), in the
    decode pass."""
    model: str | None = None
    """open_clip model for the frame-text similarity of each clip's middle frame with its subtitle and caption: a
    local folder (open_clip_config.json and weights) or a weights file with its model config beside it as
    <file stem>.json (what train.export --format open_clip writes). None: not computed (absent, not 0)."""
    batch_size: int = 32
    """Clips per call of the similarity model."""

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError("score model must be a non-empty local path or None")
        if self.batch_size < 1:
            raise ValueError(f"score batch_size must be >= 1, got {self.batch_size}")

    def computed(self) -> list[str]:
        """The names of the scores this config computes (pipeline/scores.py)."""
        return [*(QUALITY if self.quality else ()), *(SIMILARITY if self.model else ())]
