"""OCL loss: per-variant values vs a row-by-row float64 reference, with and without missing texts, and 2-rank gloo
== 1 process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.support.tiers import marks_users
from train.loss import PAIR_TERMS, VARIANT_TERMS, OCLLoss, required_features

MODALITIES = ("video", "subtitle", "caption", "frame", "text")
LOCAL_ROWS, WORLD_SIZE, IN_DIM, EMBED_DIM = 3, 2, 6, 5


# ----------------------------------------------------------------------------- independent reference


def row_ce(logits: list[float], target: int) -> float:
    top = max(logits)
    return -logits[target] + top + math.log(sum(math.exp(x - top) for x in logits))


def dot(a, b) -> float:
    return float(sum(x * y for x, y in zip(a, b)))


def ref_pair(query, candidate, scale) -> float:
    """Mean over rows i of CE([s <q_i, c_j> for all j], target i)."""
    rows = [row_ce([scale * dot(q, c) for c in candidate], i) for i, q in enumerate(query)]
    return sum(rows) / len(rows)


def ref_joint(video, positive, other, scale) -> float:
    """Row i: [s<v_i,pos_i>] + [s<v_i,pos_j>, j != i] + [s<v_i,other_j>, j != i], target 0."""
    rows = []
    for i, v in enumerate(video):
        logits = [scale * dot(v, positive[i])]
        logits += [scale * dot(v, p) for j, p in enumerate(positive) if j != i]
        logits += [scale * dot(v, o) for j, o in enumerate(other) if j != i]
        rows.append(row_ce(logits, 0))
    return sum(rows) / len(rows)


def reference_loss(variant: str, feats: dict[str, torch.Tensor], logit_scale: float) -> float:
    """Brief §2.2-2.5 restated term by term."""
    f = {k: v.double().tolist() for k, v in feats.items()}
    s = math.exp(logit_scale)

    def sym(a: str, b: str) -> float:
        return ref_pair(f[a], f[b], s) + ref_pair(f[b], f[a], s)

    if variant == "infonce":
        return sym("video", "text")
    if variant == "d":
        return (
            ref_pair(f["subtitle"], f["video"], s)
            + ref_pair(f["caption"], f["video"], s)
            + ref_joint(f["video"], f["subtitle"], f["caption"], s)
            + ref_joint(f["video"], f["caption"], f["subtitle"], s)
            + sym("frame", "caption")
        )
    extra = {
        "vs": [],
        "a": [("frame", "caption")],
        "b": [("video", "caption")],
        "c": [("video", "caption"), ("frame", "caption")],
    }[variant]
    return sym("video", "subtitle") + sum(sym(a, b) for a, b in extra)


def ref_pair_masked(query, candidate, scale, rows, columns) -> float:
    """Mean over the rows i in ``rows`` of CE([s <q_i, c_j> for j in columns], target i)."""
    out = [row_ce([scale * dot(query[i], candidate[j]) for j in columns], columns.index(i)) for i in rows]
    return sum(out) / len(out)


def ref_joint_masked(video, positive, other, scale, rows, other_rows) -> float:
    """ref_joint over the rows i in ``rows``; positive candidates from ``rows``, others from ``other_rows``."""
    out = []
    for i in rows:
        logits = [scale * dot(video[i], positive[i])]
        logits += [scale * dot(video[i], positive[j]) for j in rows if j != i]
        logits += [scale * dot(video[i], other[j]) for j in other_rows if j != i]
        out.append(row_ce(logits, 0))
    return sum(out) / len(out)


MISSING = {"subtitle": (1,), "caption": (0, 3), "text": (2,)}
"""Rows without each text in the masked cases (of 5 rows, or of the 6 of the two-rank problem)."""


def presence(rows: int) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([i not in MISSING[name] for i in range(rows)]) for name in MISSING}


def reference_masked(variant: str, feats: dict[str, torch.Tensor], logit_scale: float) -> dict[str, float]:
    """Each term of ``variant`` with the rows of MISSING left out, restated from the docstring of train/loss.py."""
    f = {k: v.double().tolist() for k, v in feats.items()}
    n, s = len(f["video"]), math.exp(logit_scale)
    has = {name: [i for i in range(n) if i not in MISSING[name]] for name in MISSING}
    every = list(range(n))
    terms = {}
    for term in VARIANT_TERMS[variant]:
        if term in ("v2s_joint", "v2c_joint"):
            pos, oth = ("subtitle", "caption") if term == "v2s_joint" else ("caption", "subtitle")
            terms[term] = ref_joint_masked(f["video"], f[pos], f[oth], s, has[pos], has[oth])
            continue
        query, candidate = PAIR_TERMS[term]
        text = query if query in MISSING else candidate
        columns = has[text] if candidate == text else every
        terms[term] = ref_pair_masked(f[query], f[candidate], s, has[text], columns)
    return terms


def random_features(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: F.normalize(torch.randn(rows, EMBED_DIM, generator=gen), dim=-1) for name in MODALITIES}


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("variant", sorted(VARIANT_TERMS))
def test_variant_equals_reference(variant):
    feats = random_features(5)
    logit_scale = torch.tensor(2.3)
    out = OCLLoss(variant)({k: feats[k] for k in required_features(variant)}, logit_scale)
    assert set(out) == set(VARIANT_TERMS[variant]) | {"loss"}
    assert out["loss"].item() == pytest.approx(reference_loss(variant, feats, 2.3), rel=1e-5)
    assert out["loss"].item() == pytest.approx(sum(out[t].item() for t in VARIANT_TERMS[variant]), rel=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANT_TERMS))
def test_rows_without_a_text_take_no_part_in_its_terms(variant):
    feats = random_features(5)
    f = {k: feats[k] for k in required_features(variant)}
    out = OCLLoss(variant)(f, torch.tensor(2.3), {k: m for k, m in presence(5).items() if k in f})
    for term, value in reference_masked(variant, feats, 2.3).items():
        assert out[term].item() == pytest.approx(value, rel=1e-5), term
        assert out[f"skipped/{term}"].item() == 0
    assert out["loss"].item() == pytest.approx(sum(out[t].item() for t in VARIANT_TERMS[variant]), rel=1e-6)
    assert {k: out[k].item() for k in out if k.startswith("without/")} == {
        f"without/{name}": len(MISSING[name]) for name in MISSING if name in f
    }


def test_every_text_present_gives_the_plain_loss():
    feats = random_features(5)
    everyone = {name: torch.ones(5, dtype=torch.bool) for name in ("subtitle", "caption")}
    plain, masked = OCLLoss("d")(feats, torch.tensor(2.3)), OCLLoss("d")(feats, torch.tensor(2.3), everyone)
    assert {t: masked[t].item() for t in plain} == pytest.approx({t: plain[t].item() for t in plain}, rel=1e-6)


def test_a_term_no_row_can_take_part_in_is_zero_skipped_and_has_finite_gradients():
    feats = {k: v.clone().requires_grad_() for k, v in random_features(4).items()}
    present = {"subtitle": torch.zeros(4, dtype=torch.bool), "caption": torch.tensor([True, False, True, True])}
    out = OCLLoss("d")({k: feats[k] for k in required_features("d")}, torch.tensor(2.3), present)
    assert [out[t].item() for t in ("s2v", "v2s_joint")] == [0.0, 0.0]
    assert [out[f"skipped/{t}"].item() for t in VARIANT_TERMS["d"]] == [1, 0, 1, 0, 0, 0]
    assert out["c2v"].item() > 0 and out["without/subtitle"].item() == 4
    out["loss"].backward()
    assert all(torch.isfinite(feats[k].grad).all() for k in required_features("d"))
    assert feats["caption"].grad[1].abs().sum() == 0  # a row without its caption: no gradient through it


def test_final_variant_has_the_six_paper_terms():
    assert VARIANT_TERMS["d"] == ("s2v", "c2v", "v2s_joint", "v2c_joint", "f2c", "c2f")


def test_joint_pool_excludes_own_caption():
    # Video 0's own caption is identical to the video: in the joint pool it must not act as a negative.
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    subtitle = video.clone()
    caption = video.clone()
    feats = {"video": video, "subtitle": subtitle, "caption": caption, "frame": video}
    terms = OCLLoss("d")(feats, torch.tensor(math.log(10.0), dtype=torch.float64))
    # each row: [10, 0 (other subtitle), 0 (other caption)] -> CE = -10 + log(e^10 + 2);
    # counting the own caption (score 10) as a negative would give about log 2 instead.
    assert terms["v2s_joint"].item() == pytest.approx(-10 + math.log(math.exp(10) + 2), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"variant": "e"}, "variant"),
        ({"variant": "d", "rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_constructor_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OCLLoss(**kwargs)


def test_missing_features_are_named():
    with pytest.raises(ValueError, match="frame"):
        OCLLoss("a")(
            {"video": torch.zeros(2, 3), "subtitle": torch.zeros(2, 3), "caption": torch.zeros(2, 3)}, torch.tensor(1.0)
        )


# ----------------------------------------------------------------------------- two gloo ranks


def make_problem(seed: int = 0):
    """Raw inputs for the global batch and one shared linear "tower" per modality."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(LOCAL_ROWS * WORLD_SIZE, IN_DIM, generator=gen) for m in MODALITIES}
    weights = {m: torch.randn(EMBED_DIM, IN_DIM, generator=gen) for m in MODALITIES}
    return inputs, weights


def loss_and_grads(variant, inputs, weights, rank=0, world_size=1, masked=False):
    """Loss on this rank's rows plus grads of the towers and logit scale (``masked``: the rows of MISSING lack
    their texts)."""
    towers = {m: w.clone().requires_grad_() for m, w in weights.items()}
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    rows = slice(rank * LOCAL_ROWS, (rank + 1) * LOCAL_ROWS) if world_size > 1 else slice(None)
    feats = {m: F.normalize(inputs[m][rows] @ towers[m].t(), dim=-1) for m in required_features(variant)}
    present = {k: m[rows] for k, m in presence(LOCAL_ROWS * WORLD_SIZE).items() if k in feats} if masked else None
    out = OCLLoss(variant, rank, world_size)(feats, logit_scale, present)
    out["loss"].backward()
    grads = {m: towers[m].grad if towers[m].grad is not None else torch.zeros_like(towers[m]) for m in towers}
    grads["logit_scale"] = logit_scale.grad
    return {k: v.detach() for k, v in out.items()}, grads


def gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        inputs, weights = make_problem()
        results = {}
        for variant in VARIANT_TERMS:
            for masked in (False, True):
                losses, grads = loss_and_grads(variant, inputs, weights, rank, world_size, masked)
                for grad in grads.values():  # what DDP / DeepSpeed do: average over ranks
                    dist.all_reduce(grad)
                    grad /= world_size
                results[variant, masked] = (losses, grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
@marks_users("ranks")
def gloo_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(gloo_worker, args=(WORLD_SIZE, free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("masked", [False, True], ids=["all_texts", "missing_texts"])
@pytest.mark.parametrize("variant", sorted(VARIANT_TERMS))
def test_two_ranks_equal_single_process_full_batch(gloo_results, variant, masked):
    inputs, weights = make_problem()
    single_losses, single_grads = loss_and_grads(variant, inputs, weights, masked=masked)
    feats = {m: F.normalize(inputs[m] @ weights[m].t(), dim=-1) for m in required_features(variant)}
    scale = math.log(1 / 0.07)
    expected = reference_loss(variant, feats, scale)
    if masked:
        expected = sum(reference_masked(variant, feats, scale).values())
    assert single_losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    for rank_results in gloo_results:
        losses, grads = rank_results[variant, masked]
        for term, value in single_losses.items():
            torch.testing.assert_close(losses[term], value, msg=term)
        for name, grad in single_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert single_grads["video"].abs().sum() > 0


def test_an_empty_or_blank_text_is_told_from_its_tokens():
    from train.loop import has_text
    from train.tokenizer import ClipTokenizer

    tokens = ClipTokenizer(context_length=8)(["", "  \n", "a", "a cat sat on the mat today again"])
    assert has_text(tokens).tolist() == [False, False, True, True]
    assert has_text(tokens[:2, :2]).tolist() == [False, False]  # a batch of empty texts, cut to its longest row
