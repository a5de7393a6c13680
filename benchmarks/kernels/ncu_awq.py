"""Eager launches of the batch-1 int4 kernels for Nsight Compute (``ncu``) to read.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/kernels/ncu_awq.py [--model llama2-7b] [--shapes qkv,gate_up]

For each linear of the model (group 128, one token): tinygemm (bf16) and the K-packed
GEMV (bf16, shipped config), each launched twice
(the first compiles; profile the second with ``--launch-skip``/``-k``). Prints nothing
worth reading itself: the counters are ncu's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_awq_gemv import GROUP, MODEL_SHAPES  # noqa: E402


def main() -> None:
    from kvflow.kernels.awq_gemv import awq_gemv
    from kvflow.quantization import awq_format, awq_int4pack, awq_kpack

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    args = ap.parse_args()
    wanted = args.shapes.split(",")
    for name, n, k in MODEL_SHAPES[args.model]:
        if name not in wanted:
            continue
        packed = awq_format.quantize(torch.randn(n, k, device="cuda") * 0.02, GROUP)
        kp = awq_kpack.convert_awq(*packed)
        tiny = awq_int4pack.convert_awq(*packed, GROUP)
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        for _ in range(2):
            awq_int4pack.int4pack_linear(x, tiny)
            awq_gemv(x, kp.words, kp.scales_zeros, kp.group_size)
        torch.cuda.synchronize()
        print(f"{name} {n}x{k} done", flush=True)


if __name__ == "__main__":
    main()
