"""Proxy-guided attention speed: ours (two mask-free SDPA calls) vs the original and a dense mask.

Variants, all computing the same function (checked before timing):
  fused     train.model.fused_proxy_attention: proxies' queries over all N tokens, then patch
            queries [B*T, H, L, K] over [proxy; own-frame] keys (proxy k/v expanded, one cat).
  original  the reference implementation's style: q pre-scaled, two unfused bmm + softmax passes, proxy k/v copied per
            frame with `repeat`.
  dense     one SDPA over all N = M + T*L tokens with the boolean (N, N) pattern mask.
Two levels: the attention op alone (packed qkv [B, N, 3D] -> [B, N, D], forward + backward) and the
whole video tower (open_clip blocks: LN, in/out proj, MLP; forward + backward). Repetitions are
interleaved across variants and the median is reported with ratios (variant time / fused time).

    python bench/attention.py                         # CPU fp32, B/32 and B/16 sizes
    python bench/attention.py --device cuda --dtype bf16
    python bench/attention.py --quick                 # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.transformer import QuickGELU, Transformer
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.model import AttendFn, dense_proxy_attention, fused_proxy_attention, run_video_blocks  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATCHES = {"B/32": 49, "B/16": 196}


def original_proxy_attention(
    q_BNHK: Tensor, k_BNHK: Tensor, v_BNHK: Tensor, num_proxies: int, num_frames: int, dropout_p: float = 0.0
) -> Tensor:
    """The released code's formulation: bmm + softmax twice, proxies repeated per frame (no dropout)."""
    B, N, H, K = q_BNHK.shape
    M, T = num_proxies, num_frames
    L = (N - M) // T

    def per_head(x_BNHK: Tensor) -> Tensor:
        return x_BNHK.transpose(1, 2).reshape(B * H, N, K)

    def per_frame(x_bh_N_K: Tensor) -> Tensor:
        return x_bh_N_K[:, M:].reshape(B * H, T, L, K)

    q, k, v = per_head(q_BNHK * K**-0.5), per_head(k_BNHK), per_head(v_BNHK)
    out_proxies = torch.bmm(torch.softmax(torch.bmm(q[:, :M], k.transpose(1, 2)), dim=-1), v)
    k_frames = torch.cat([k[:, None, :M].repeat(1, T, 1, 1), per_frame(k)], 2).flatten(0, 1)
    v_frames = torch.cat([v[:, None, :M].repeat(1, T, 1, 1), per_frame(v)], 2).flatten(0, 1)
    scores = torch.bmm(per_frame(q).flatten(0, 1), k_frames.transpose(1, 2))
    out_frames = torch.bmm(torch.softmax(scores, dim=-1), v_frames).reshape(B * H, T * L, K)
    out = torch.cat([out_proxies, out_frames], dim=1).reshape(B, H, N, K)
    return out.transpose(1, 2).reshape(B, N, H * K)


VARIANTS: dict[str, AttendFn] = {
    "fused": fused_proxy_attention,
    "original": original_proxy_attention,
    "dense": dense_proxy_attention,
}


@dataclass(frozen=True)
class Shape:
    batch: int
    frames: int
    proxies: int
    patches: int
    width: int
    heads: int

    @property
    def tokens(self) -> int:
        return self.proxies + self.frames * self.patches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def op_step(shape: Shape, qkv_BN3D: Tensor, grad_BND: Tensor) -> Callable[[AttendFn], Tensor]:
    """Forward + backward of one attention function on packed qkv."""
    B, N, H = shape.batch, shape.tokens, shape.heads

    def step(attend: AttendFn) -> Tensor:
        q, k, v = qkv_BN3D.view(B, N, 3, H, -1).unbind(2)
        out_BND = attend(q, k, v, shape.proxies, shape.frames, 0.0)
        out_BND.backward(grad_BND)
        qkv_BN3D.grad = None
        return out_BND.detach()

    return step


def tower_step(
    shape: Shape, layers: int, tokens_BND: Tensor, grad_BND: Tensor, device: torch.device, dtype: torch.dtype
) -> Callable[[AttendFn], Tensor]:
    """Forward + backward of the whole video tower (open_clip blocks) with one attention function."""
    torch.manual_seed(0)
    blocks = Transformer(shape.width, layers, shape.heads, act_layer=QuickGELU).resblocks.to(device, dtype)

    def step(attend: AttendFn) -> Tensor:
        out_BND = run_video_blocks(blocks, tokens_BND, attend, shape.proxies, shape.frames)
        out_BND.backward(grad_BND)
        tokens_BND.grad = None
        blocks.zero_grad(set_to_none=True)
        return out_BND.detach()

    return step


def time_interleaved(step: Callable[[AttendFn], Tensor], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per variant over `reps` rounds, each round running every variant once."""
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(reps):
        for name, attend in VARIANTS.items():
            synchronize(device)
            start = time.perf_counter()
            step(attend)
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def check_agreement(step: Callable[[AttendFn], Tensor]) -> float:
    """Max abs difference of every variant's output from the fused one (also the warm-up run)."""
    outputs = {name: step(attend).float() for name, attend in VARIANTS.items()}
    return max((outputs[name] - outputs["fused"]).abs().max().item() for name in VARIANTS)


def report(level: str, size: str, shape: Shape, medians: dict[str, float], max_diff: float) -> None:
    fused = medians["fused"]
    cells = "  ".join(f"{name} {1e3 * t:9.1f} ms" for name, t in medians.items())
    ratios = "  ".join(f"{name}/fused {t / fused:5.2f}x" for name, t in medians.items() if name != "fused")
    print(
        f"{level:5s} {size} B={shape.batch} L={shape.patches:3d} N={shape.tokens:5d}  {cells}  |  {ratios}  "
        f"(max|diff| {max_diff:.1e})",
        flush=True,
    )


def run_level(level: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    for size in args.sizes:
        batch = args.batch if level == "op" else args.tower_batch or args.batch
        shape = Shape(batch, args.frames, args.proxies, PATCHES[size], args.width, args.heads)
        gen = torch.Generator(device=device).manual_seed(0)
        D = shape.width
        grad = torch.randn(shape.batch, shape.tokens, D, device=device, dtype=dtype, generator=gen)
        if level == "op":
            qkv = torch.randn(shape.batch, shape.tokens, 3 * D, device=device, dtype=dtype, generator=gen)
            step = op_step(shape, qkv.requires_grad_(), grad)
            reps = args.reps
        else:
            tokens = torch.randn(shape.batch, shape.tokens, D, device=device, dtype=dtype, generator=gen)
            step = tower_step(shape, args.layers, tokens.requires_grad_(), grad, device, dtype)
            reps = args.tower_reps
        max_diff = check_agreement(step)
        report(level, size, shape, time_interleaved(step, reps, device), max_diff)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--proxies", type=int, default=4)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tower-batch", type=int, default=0, help="batch for the tower (0: --batch)")
    parser.add_argument("--layers", type=int, default=12, help="blocks in the tower benchmark")
    parser.add_argument("--reps", type=int, default=9, help="timed rounds for the op benchmark")
    parser.add_argument("--tower-reps", type=int, default=3, help="timed rounds for the tower benchmark")
    parser.add_argument("--sizes", nargs="+", default=list(PATCHES), choices=list(PATCHES))
    parser.add_argument("--levels", nargs="+", default=["op", "tower"], choices=["op", "tower"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 1, 2 frames, 1 layer, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.tower_batch, args.frames, args.layers, args.reps, args.tower_reps = 1, 1, 2, 1, 1, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} batch={args.batch} "
        f"tower_batch={args.tower_batch or args.batch} frames={args.frames} proxies={args.proxies} "
        f"width={args.width} heads={args.heads} tower_layers={args.layers}",
        flush=True,
    )
    for level in args.levels:
        run_level(level, args, device, dtype)


if __name__ == "__main__":
    main()
