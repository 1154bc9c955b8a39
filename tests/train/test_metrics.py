"""Retrieval metrics on small hand-computed similarity matrices (ranks worked out in comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.metrics import dual_softmax, retrieval_metrics, t2v_ranks, v2t_ranks


def test_one_text_per_video():
    sim = [
        [0.9, 0.1, 0.3],
        [0.2, 0.5, 0.8],  # text 1: video 2 (0.8) beats its video 1 (0.5) -> rank 2
        [0.4, 0.4, 0.7],
    ]
    # v2t: video 2's column [0.3, 0.8, 0.7]: text 1 beats text 2 -> rank 2; others rank 1
    m = retrieval_metrics(np.array(sim), [0, 1, 2])
    assert m["t2v_r1"] == pytest.approx(200 / 3)
    assert m["t2v_r5"] == m["t2v_r10"] == 100.0
    assert m["t2v_medr"] == 1.0
    assert m["t2v_meanr"] == pytest.approx(4 / 3)
    assert m["v2t_r1"] == pytest.approx(200 / 3)
    assert m["v2t_meanr"] == pytest.approx(4 / 3)
    assert not any(key.startswith("dsl/") for key in m)


def test_ties_are_optimistic():
    # every candidate tied with the ground truth -> rank 1; only strictly higher scores count
    np.testing.assert_array_equal(t2v_ranks(np.full((2, 2), 0.5), np.array([0, 1])), [1, 1])
    sim = np.array([[0.5, 0.5, 0.6, 0.5]])
    np.testing.assert_array_equal(t2v_ranks(sim, np.array([0])), [2])
    np.testing.assert_array_equal(v2t_ranks(np.array([[0.3], [0.3], [0.3]]), np.array([0, 0, 0])), [1])


def test_several_texts_per_video_msrvtt_style():
    sim = np.array(
        [
            [0.1, 0.9],  # text 0 (video 0): rank 2
            [0.8, 0.2],  # text 1 (video 0): rank 1
            [0.3, 0.4],  # text 2 (video 1): rank 1
            [0.6, 0.5],
        ]
    )  # text 3 (video 1): rank 2
    # v2t video 0: its best text is 1 (0.8), nothing higher -> 1.
    # v2t video 1: its best text is 3 (0.5); text 0 has 0.9 -> 2.
    np.testing.assert_array_equal(t2v_ranks(sim, np.array([0, 0, 1, 1])), [2, 1, 1, 2])
    np.testing.assert_array_equal(v2t_ranks(sim, np.array([0, 0, 1, 1])), [1, 2])
    m = retrieval_metrics(torch.tensor(sim), [0, 0, 1, 1])
    assert m["t2v_r1"] == 50.0 and m["t2v_medr"] == 1.5 and m["t2v_meanr"] == 1.5
    assert m["v2t_r1"] == 50.0 and m["v2t_medr"] == 1.5 and m["v2t_r5"] == 100.0


def test_videos_without_texts_are_gallery_only():
    sim = np.array(
        [
            [0.9, 0.1, 0.95],  # text 0 -> video 0, beaten by the distractor video 2
            [0.2, 0.7, 0.1],
        ]
    )
    assert list(t2v_ranks(sim, np.array([0, 1]))) == [2, 1]
    assert list(v2t_ranks(sim, np.array([0, 1]))) == [1, 1]  # video 2 is not a v2t query


def test_dsl_values_and_metrics():
    # a "hub" video 0 close to both texts; DSL (softmax over texts, x100) demotes it for text 1
    sim = np.array([[0.8, 0.3], [0.7, 0.6]])
    col0 = [math.exp(80), math.exp(70)]
    col1 = [math.exp(30), math.exp(60)]
    expected = np.array(
        [[0.8 * col0[0] / sum(col0), 0.3 * col1[0] / sum(col1)], [0.7 * col0[1] / sum(col0), 0.6 * col1[1] / sum(col1)]]
    )
    np.testing.assert_allclose(dual_softmax(sim), expected, rtol=1e-12)
    m = retrieval_metrics(sim, [0, 1], dsl=True)
    assert m["t2v_r1"] == 50.0  # text 1: 0.7 (video 0) > 0.6
    assert m["dsl/t2v_r1"] == 100.0  # 0.7 * 4.5e-5 < 0.6 * ~1
    assert m["dsl/v2t_r1"] == 100.0
    assert set(m) == {
        f"{p}{d}_{k}" for p in ("", "dsl/") for d in ("t2v", "v2t") for k in ("r1", "r5", "r10", "medr", "meanr")
    }


@pytest.mark.parametrize(
    "sim, mapping, message",
    [
        (np.zeros((2, 2)), [0], "entries"),
        (np.zeros((2, 2)), [0, 2], r"\[0, 2\)"),
        (np.array([[np.nan, 0.0], [0.0, 0.0]]), [0, 1], "NaN"),
        (np.zeros(3), [0, 1, 2], "2-D"),
    ],
)
def test_bad_inputs_raise(sim, mapping, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sim, mapping)
