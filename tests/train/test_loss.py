"""OCL loss: per-variant values vs a row-by-row float64 reference, and 2-rank gloo == 1 process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.loss import VARIANT_TERMS, OCLLoss, required_features

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


def loss_and_grads(variant, inputs, weights, rank=0, world_size=1):
    """Loss on this rank's rows plus grads of the towers and logit scale."""
    towers = {m: w.clone().requires_grad_() for m, w in weights.items()}
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    rows = slice(rank * LOCAL_ROWS, (rank + 1) * LOCAL_ROWS) if world_size > 1 else slice(None)
    feats = {m: F.normalize(inputs[m][rows] @ towers[m].t(), dim=-1) for m in required_features(variant)}
    out = OCLLoss(variant, rank, world_size)(feats, logit_scale)
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
            losses, grads = loss_and_grads(variant, inputs, weights, rank, world_size)
            for grad in grads.values():  # what DDP / DeepSpeed do: average over ranks
                dist.all_reduce(grad)
                grad /= world_size
            results[variant] = (losses, grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(gloo_worker, args=(WORLD_SIZE, free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("variant", sorted(VARIANT_TERMS))
def test_two_ranks_equal_single_process_full_batch(gloo_results, variant):
    inputs, weights = make_problem()
    single_losses, single_grads = loss_and_grads(variant, inputs, weights)
    feats = {m: F.normalize(inputs[m] @ weights[m].t(), dim=-1) for m in required_features(variant)}
    assert single_losses["loss"].item() == pytest.approx(reference_loss(variant, feats, math.log(1 / 0.07)), rel=1e-5)
    for rank_results in gloo_results:
        losses, grads = rank_results[variant]
        for term, value in single_losses.items():
            torch.testing.assert_close(losses[term], value, msg=term)
        for name, grad in single_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert single_grads["video"].abs().sum() > 0
