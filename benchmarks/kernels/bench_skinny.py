"""bf16 matmul at 9..64 tokens (decode batches of a serving load): cuBLAS against the
Triton GEMV's tl.dot path, per Llama-3-8B matrix, in CUDA graphs.

    python benchmarks/kernels/bench_skinny.py [--tokens 16,24,32,48,64]

Why: a decode step at batch 18 took 6.94 ms against 5.59 ms at batch 1
(benchmarks/step_times.py): the Triton GEMV serves <= 8 tokens, cuBLAS the rest, and
cuBLAS' skinny GEMMs stream the weights slower. This sweeps a few tiles of
``kvflow.kernels.gemv`` at those token counts (timing and checking as
bench_gemv.py does) and prints, per matrix and M, cuBLAS, the best tile, and the
tile that wins most often overall.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import bench_gemv as bg  # noqa: E402

from kvflow.kernels.gemv import GemvConfig, gemv  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TILES = [GemvConfig(bn, bk, s, True, w, st) for bn, bk, s, w, st in [
    (64, 256, 1, 4, 3), (64, 256, 2, 4, 3), (64, 128, 1, 4, 4), (32, 256, 1, 4, 4),
    (128, 128, 1, 8, 3), (128, 64, 1, 4, 4), (64, 128, 2, 4, 4), (32, 128, 1, 4, 4)]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,24,32,48,64")
    args = ap.parse_args()
    copy = bg.copy_bandwidth_tbs()
    print(f"copy {copy:.2f} TB/s")
    wins: dict[GemvConfig, int] = {}
    print("| matrix | M | cuBLAS us | best Triton us | ratio | best tile |")
    print("|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = bg.num_copies(n * k * 2)
        weights = bg.dense_weights(n, k, copies)
        for m in [int(t) for t in args.tokens.split(",")]:
            x = (torch.randn(m, k, device=bg.DEVICE) * 0.5).to(torch.bfloat16)
            ref = x.float() @ weights[0].float().T
            cublas = bg.time_config(lambda i: F.linear(x, weights[i]), copies, ref, "cublas", 2e-2)
            best = (float("inf"), None)
            for cfg in TILES:
                t = bg.time_config(lambda i, c=cfg: gemv(x, weights[i], config=c), copies, ref,
                                   f"{name} M={m} {cfg}", 2e-2)
                if t < best[0]:
                    best = (t, cfg)
            wins[best[1]] = wins.get(best[1], 0) + 1
            c = best[1]
            print(f"| {name} | {m} | {cublas:.1f} | {best[0]:.1f} | {best[0] / cublas:.2f} | "
                  f"{c.block_n}x{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages} |", flush=True)
    print("wins:", {f"{c.block_n}x{c.block_k}s{c.split_k}w{c.num_warps}st{c.num_stages}": v
                    for c, v in wins.items()})
    return 1 if bg.FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
