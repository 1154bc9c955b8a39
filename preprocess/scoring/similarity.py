"""Frame-text similarity: an open_clip model embeds a clip's middle frame and its subtitle and caption.

Ray-agnostic: :class:`FrameTextScorer` loads the model once and scores a batch of clips; the Ray job
(:mod:`preprocess.job`) holds one per actor, as it does the caption and ASR models. The model is local (no hub
download): a folder in open_clip's own layout (``open_clip_config.json`` and its weights, read through
open_clip's ``local-dir:``), or a weights file with its model config beside it (``<stem>.json``, registered
under the name ``<stem>``), as ``python -m train.export --format open_clip`` writes them.

A score is the cosine of the L2-normalised image and text embeddings (-1..1), rounded to ``DIGITS``
decimals; an empty text gets no score (absent, never 0). A text longer than the model's context is cut by
its tokenizer.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from pipeline import storage
from preprocess.scoring.quality import DIGITS
from preprocess.text.stages import ModelError

log = logging.getLogger(__name__)

ScoreInput = tuple[bytes, str, str]
"""One clip for the model: its middle frame (JPEG bytes), subtitle and caption."""
ScorePair = tuple[float | None, float | None]
"""The similarity of the middle frame with the subtitle and with the caption (None: that text is empty)."""
FOLDER_CONFIG = "open_clip_config.json"


def model_source(path: str) -> tuple[str, str | None, str]:
    """(open_clip model name, weights file or None, config file) of ``path``; ValueError naming it and why."""
    what = f"score model {path}"
    if storage.has_scheme(path):
        raise ValueError(f"{what}: must be a local folder or file (present on every node), not a URI")
    if os.path.isdir(path):
        config = os.path.join(path, FOLDER_CONFIG)
        if not os.path.isfile(config):
            raise ValueError(f"{what}: no {FOLDER_CONFIG} (not an open_clip model folder)")
        return f"local-dir:{path}", None, config
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file or folder")
    config = str(Path(path).with_suffix(".json"))
    if not os.path.isfile(config):
        raise ValueError(f"{what}: no model config {config} beside the weights (train.export writes both)")
    return Path(config).stem, path, config


def check_score_model(path: str) -> None:
    """Fail fast, before any work: the model's files are there and its config names an image and a text tower."""
    _, _, config = model_source(path)
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"score model {path}: unreadable config {config} ({exc})") from exc
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(model_cfg, dict) or not {"vision_cfg", "text_cfg"} <= model_cfg.keys():
        raise ValueError(f"score model {path}: {config} is not an open_clip CLIP config (no vision_cfg and text_cfg)")


class FrameTextScorer:
    """One loaded open_clip model: ``scorer(batch) -> [(subtitle similarity, caption similarity)]``, in order."""

    def __init__(self, path: str, device: str = "cpu"):
        import open_clip
        import torch

        check_score_model(path)
        name, weights, config = model_source(path)
        if weights is not None:
            open_clip.add_model_config(config)
        model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self._torch = device, torch
        log.info("score model %s loaded on %s", path, device)

    def __call__(self, batch: list[ScoreInput]) -> list[ScorePair]:
        from PIL import Image

        if not batch:
            return []
        torch = self._torch
        images = torch.stack([self.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg, _, _ in batch])
        texts = [(i, k, text) for i, item in enumerate(batch) for k, text in enumerate(item[1:]) if text.strip()]
        with torch.inference_mode():
            image = _normalised(self.model.encode_image(images.to(self.device)))
            out: list[list[float | None]] = [[None, None] for _ in batch]
            if texts:
                tokens = self.tokenizer([text for _, _, text in texts]).to(self.device)
                text = _normalised(self.model.encode_text(tokens))
                for row, (i, k, _) in enumerate(texts):
                    out[i][k] = round(float(image[i] @ text[row]), DIGITS)
        return [(a, b) for a, b in out]


def _normalised(features):
    return features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)


def guarded_scores(fn: Callable[[list[ScoreInput]], list[ScorePair]], batch: list[ScoreInput]) -> list[ScorePair]:
    """Call ``fn``; any exception it raises becomes a ModelError; checks one pair of finite numbers (or None)
    per input."""
    try:
        pairs = list(fn(batch))
    except Exception as exc:  # the model's own failure, whatever its type
        raise ModelError(f"{type(exc).__name__}: {exc}") from exc
    if len(pairs) != len(batch) or not all(_is_pair(p) for p in pairs):
        raise ModelError(f"the score model returned {len(pairs)} results for {len(batch)} inputs, or non-numbers")
    return pairs


def _is_pair(pair: object) -> bool:
    return (
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in pair)
    )
