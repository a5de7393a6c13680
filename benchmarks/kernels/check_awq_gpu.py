"""AWQ int4 kernels on the GPU: correctness against the plain-torch reference, then timings.

    python benchmarks/kernels/check_awq_gpu.py [--quick] [--no-timing]
    TRITON_INTERPRET=1 python benchmarks/kernels/check_awq_gpu.py --smoke   # CPU dry run

1. Correctness (exit status 1 on any mismatch): ``awq_dequantize`` must equal the
   reference bit for bit; ``awq_gemm`` must match ``x @ W.T`` in float32 on the
   same rounded weight within a per-dtype tolerance, for the linear shapes of
   Llama-2-7B and Llama-3-8B, group sizes 32/64/128/-1, batch 1..256, fp16 and
   bf16. ``AWQLinearMethod.apply`` is checked on both sides of its fused/cuBLAS
   threshold, and one fused GEMM is captured in a CUDA graph and replayed.
2. Timings (bf16, group 128; median of ``triton.testing.do_bench``): the fused
   GEMM, dequantize + cuBLAS, and a bf16 ``F.linear`` on an unquantized weight of
   the same shape, with the fused kernel's bandwidth over the bytes it must read.
   The last lines suggest ``DEFAULT_MAX_FUSED_TOKENS`` (kvflow/quantization/awq.py)
   from the measured crossover. Tile sweeps for decode batches live in
   benchmarks/kernels/bench_gemv.py.

``--smoke`` runs the correctness part at toy shapes on the CPU under Triton's
interpreter: a check of this script, not of the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# (name, K, N) of each linear as the engine runs it (q/k/v and gate/up fused).
SHAPES = {
    "llama2-7b": [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016),
                  ("down", 11008, 4096)],
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
                  ("down", 14336, 4096)],
}
BATCHES = [1, 2, 3, 4, 8, 16, 17, 32, 64, 100, 128, 256]
TIMED_BATCHES = [1, 4, 8, 16, 32, 64, 128, 256]
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.6e-2}  # relative to max |reference|

FAILURES: list[str] = []
DEVICE = "cuda"  # "cpu" with --smoke


def fail(message: str) -> None:
    FAILURES.append(message)
    print(f"FAIL {message}", flush=True)


def packed_weight(num_in: int, num_out: int, group: Optional[int], seed: int):
    from kvflow.quantization import awq_format

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = torch.randn(num_out, num_in, device=DEVICE, generator=gen) * 0.02
    return awq_format.quantize(weight, group)


def check_correctness(quick: bool) -> None:
    from kvflow.kernels import awq_gemm as kernels
    from kvflow.quantization import awq_format

    cases = []
    for model, shapes in SHAPES.items():
        for name, k, n in shapes:
            cases.append((f"{model}.{name}", k, n, 128))
    cases += [("llama3-8b.o g32", 4096, 4096, 32), ("llama3-8b.down g64", 14336, 4096, 64),
              ("llama3-8b.qkv g-1", 4096, 6144, None), ("llama2-7b.down g-1", 11008, 4096, None)]
    if quick:
        cases = cases[4:]
    batches = [1, 3, 17, 64, 256] if quick else BATCHES
    if DEVICE == "cpu":
        cases = [("toy", 256, 96, 128), ("toy g32", 128, 40, 32), ("toy g-1", 96, 64, None)]
        batches = [1, 3, 17]
    for label, k, n, group in cases:
        packed = packed_weight(k, n, group, seed=k + n)
        exact = awq_format.dequantize(*packed, torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            weight = exact.to(dtype)
            if DEVICE == "cpu" and dtype == torch.bfloat16:
                # Triton's interpreter truncates float32 -> bfloat16; the GPU rounds to nearest.
                weight = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
            got = kernels.awq_dequantize(*packed, dtype)
            if not torch.equal(got, weight):
                bad = (got != weight).sum().item()
                fail(f"dequantize {label} {dtype}: {bad} of {weight.numel()} elements differ")
            w32 = weight.float()
            for m in batches:
                x = torch.randn(m, k, device=DEVICE).to(dtype)
                ref = x.float() @ w32.t()
                g = k if group is None else group
                configs = [kernels.default_gemm_config(m, n, k, g, x.device)]
                if m <= kernels.GEMV_MAX_TOKENS:  # the tensor-core kernel runs one token too
                    configs.append(kernels.default_gemm_config(16, n, k, g, x.device))
                for cfg in configs:
                    out = kernels.awq_gemm(x, *packed, config=cfg)
                    err = (out.float() - ref).abs().max().item()
                    scale = ref.abs().max().item()
                    if not (torch.isfinite(out).all().item() and err <= TOL[dtype] * scale):
                        fail(f"gemm {label} M={m} {dtype}: max err {err:.3e} vs max |ref| "
                             f"{scale:.3e} (tol {TOL[dtype]}), config {cfg}")
        print(f"checked {label} (K={k}, N={n}, group={group or -1})", flush=True)


def check_linear_method_and_graphs() -> None:
    from kvflow.kernels import awq_gemm as kernels
    from kvflow.layers.linear import ColumnParallelLinear
    from kvflow.quantization import awq_format
    from kvflow.quantization.awq import AWQConfig, AWQLinearMethod

    k, n = 4096, 6144
    packed = packed_weight(k, n, 128, seed=1)
    method = AWQLinearMethod(AWQConfig(group_size=128), max_fused_tokens=16,
                             kernel="triton")  # tinygemm has its own checks (bench_gemv --int4pack)
    with torch.device("cuda"):
        layer = ColumnParallelLinear(k, n, bias=True, dtype=torch.bfloat16, linear_method=method)
    for name, tensor in zip(("qweight", "qzeros", "scales"), packed):
        layer.weight_loader(getattr(layer, name), tensor)
    layer.bias.data.normal_()
    method.process_weights_after_loading(layer)
    if layer.dequantized_weight is not None:
        fail("process_weights_after_loading cached a dequantized weight on CUDA")
    weight = awq_format.dequantize(*packed, torch.bfloat16).float()
    for m in (1, 16, 17, 300):  # fused below/at the threshold, cuBLAS above it
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ weight.t() + layer.bias.float()
        err = (layer(x).float() - ref).abs().max().item()
        if err > TOL[torch.bfloat16] * ref.abs().max().item():
            fail(f"AWQLinearMethod.apply M={m}: max err {err:.3e}")
    # Decode steps are replayed from CUDA graphs: the fused GEMM (split-K included)
    # must capture without host syncs and replay the same numbers.
    x = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
    eager = kernels.awq_gemm(x, *packed)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.awq_gemm(x, *packed)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.awq_gemm(x, *packed)
    graph.replay()
    torch.cuda.synchronize()
    if not torch.equal(captured, eager):
        fail("CUDA graph replay of awq_gemm differs from the eager result")
    print("checked AWQLinearMethod.apply and CUDA graph capture", flush=True)


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def timings(quick: bool) -> None:
    from kvflow.kernels import awq_gemm as kernels

    print("\n| model.linear | K | N | M | bf16 F.linear us | AWQ fused us | fused TB/s "
          "| dequant+cuBLAS us | fused vs bf16 | best AWQ path |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    crossover: dict[str, Optional[int]] = {}
    shapes = [("llama3-8b", s) for s in SHAPES["llama3-8b"]]
    if not quick:
        shapes += [("llama2-7b", s) for s in SHAPES["llama2-7b"]]
    for model, (name, k, n) in shapes:
        packed = packed_weight(k, n, 128, seed=3)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed_bytes = sum(t.numel() * t.element_size() for t in packed)
        label = f"{model}.{name}"
        crossover[label] = None
        for m in TIMED_BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_dense = bench(lambda: F.linear(x, dense))
            t_fused = bench(lambda: kernels.awq_gemm(x, *packed))
            t_deq = bench(lambda: F.linear(x, kernels.awq_dequantize(*packed, torch.bfloat16)))
            moved = packed_bytes + x.numel() * 2 + m * n * 2
            best = "fused" if t_fused <= t_deq else "dequant+cuBLAS"
            if best != "fused" and crossover[label] is None:
                crossover[label] = m
            print(f"| {label} | {k} | {n} | {m} | {t_dense * 1e3:.1f} | {t_fused * 1e3:.1f} | "
                  f"{moved / t_fused / 1e9:.2f} | {t_deq * 1e3:.1f} | "
                  f"{t_dense / t_fused:.2f}x | {best} |", flush=True)
    print()
    for label, m in crossover.items():
        print(f"{label}: dequant+cuBLAS first wins at M={m}" if m else
              f"{label}: the fused GEMM wins up to M={TIMED_BATCHES[-1]}")
    firsts = [m for m in crossover.values() if m is not None]
    if firsts:
        prev = max(b for b in TIMED_BATCHES if b < min(firsts)) if min(firsts) > 1 else 0
        print(f"suggested DEFAULT_MAX_FUSED_TOKENS: {prev} "
              "(the largest timed batch below every crossover)")
    else:
        print(f"suggested DEFAULT_MAX_FUSED_TOKENS: >= {TIMED_BATCHES[-1]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and batches")
    ap.add_argument("--no-timing", action="store_true", help="correctness only")
    ap.add_argument("--smoke", action="store_true",
                    help="toy shapes on CPU under TRITON_INTERPRET=1 (checks the script only)")
    args = ap.parse_args()
    if args.smoke:
        global DEVICE
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment.")
            return 2
        DEVICE = "cpu"
        check_correctness(quick=True)
        print(f"smoke run: {len(FAILURES)} failure(s)")
        return 1 if FAILURES else 0
    if not torch.cuda.is_available():
        print("check_awq_gpu.py needs a CUDA GPU.")
        return 2
    import triton

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {triton.__version__}", flush=True)
    check_correctness(args.quick)
    check_linear_method_and_graphs()
    if not args.no_timing:
        timings(args.quick)
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) failed:")
        for message in FAILURES:
            print(f"  {message}")
        return 1
    print("\nall AWQ kernel checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
