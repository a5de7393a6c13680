"""Small-batch GEMV on the GPU: cuBLAS against kvflow's Triton kernels, bf16 and AWQ int4.

    python benchmarks/kernels/bench_gemv.py [--quick] [--json PATH] [--jobs N]
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_gemv.py --smoke   # CPU dry run
    python benchmarks/kernels/bench_gemv.py --int4pack [--smoke]          # tinygemm table

For the linear shapes of Llama-3-8B and Llama-2-7B (q/k/v and gate/up fused, and
the LM head) at M = 1, 2, 4, 8 tokens it times:

  F.linear           cuBLAS on a bf16 weight
  triton bf16        ``kvflow.kernels.gemv`` with the shipped heuristic, and the best
                     config of a small sweep (the sweep is printed)
  awq int4           ``kvflow.kernels.awq_gemm`` (group 128) with the shipped heuristic,
                     and the best of its sweep
  dequant + F.linear the AWQ fallback: dequantize kernel, then cuBLAS

Each time is per call inside a CUDA graph, the way decode runs: a graph of R calls
cycles through enough copies of the weight that they do not fit in L2, and the
median over replays is divided by R. TB/s counts the bytes a call must move (weight,
scales and zeros, x and y). The device's copy bandwidth is measured in the same
run. Every config timed is also checked against float32 torch on that shape
(exit status 1 on any mismatch), and graph replays must equal eager calls.

``--quick``: Llama-3-8B only, M = 1 and 4, shipped heuristic only (no sweep).
``--int4pack``: Llama-3-8B's AWQ linears at M = 1, 2, 4, 8, 16: bf16 cuBLAS, the Triton
int4 kernel (shipped heuristic) and PyTorch's tinygemm (``torch._weight_int4pack_mm``
on the repack of ``kvflow.quantization.awq_int4pack``), each checked like the rest.
``--smoke``: toy shapes on the CPU under Triton's interpreter (checks the script).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# (name, N, K) of each linear as the engine runs it.
SHAPES = {
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                  ("down", 4096, 14336), ("lm_head", 128256, 4096)],
    "llama2-7b": [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096),
                  ("down", 4096, 11008), ("lm_head", 32000, 4096)],
}
SMOKE_SHAPES = {"toy": [("a", 96, 256), ("b", 264, 384)]}
TOKENS = (1, 2, 4, 8, 16)
GROUP = 128
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 3e-3}  # of max |reference|
L2_MARGIN_BYTES = 160 << 20  # weight copies per graph: comfortably past a 50-60 MB L2
CALLS_PER_GRAPH = 16  # at least; spreads the graph launch's own latency thin

FAILURES: list[str] = []
DEVICE = "cuda"


def fail(message: str) -> None:
    FAILURES.append(message)
    print(f"FAIL {message}", flush=True)


def bf16_candidates(m: int):
    """(tile, splits) of the bf16 sweep, around the shipped table."""
    from kvflow.kernels.gemv import GemvConfig

    if m == 1:
        return [(GemvConfig(8, 1024, num_warps=4, num_stages=3), (1, 2)),
                (GemvConfig(4, 512, num_warps=2, num_stages=4), (1, 2)),
                (GemvConfig(8, 512, num_warps=2, num_stages=3), (1,)),
                (GemvConfig(4, 2048, num_warps=8, num_stages=3), (1,))]
    return [(GemvConfig(64, 256, num_warps=4, num_stages=3, use_dot=True), (1, 2, 4)),
            (GemvConfig(64, 128, num_warps=4, num_stages=4, use_dot=True), (1, 2, 4)),
            (GemvConfig(128, 128, num_warps=4, num_stages=3, use_dot=True), (1, 2))]


def awq_candidates(m: int):
    """(config, splits) of the int4 sweep."""
    from kvflow.kernels.awq_gemm import AWQGemmConfig

    out = []
    if m == 1:
        for vec, bk, warps, stages in [(1, 32, 1, 3), (1, 16, 4, 3), (2, 16, 2, 4), (1, 16, 2, 4)]:
            cfg = AWQGemmConfig(1, 256 * warps * vec, bk, num_warps=warps, num_stages=stages,
                                use_tensor_cores=False)
            out.append((cfg, (8, 16, 32, 64)))
    for bn, bk, stages in [(64, 128, 3), (64, 64, 4), (256, 64, 3)]:
        out.append((AWQGemmConfig(16, bn, bk, num_warps=4, num_stages=stages), (1, 2, 4, 8)))
    return out


# ---------------------------------------------------------------- timing

def per_call_us(calls: list[Callable[[], torch.Tensor]], check_against: list[torch.Tensor]
                ) -> float:
    """Median microseconds per call of a CUDA graph that runs ``calls`` in order.

    The graph's outputs must equal ``check_against`` (the same calls run eagerly):
    every kernel here is deterministic and free of host syncs, so capture must not
    change a bit.
    """
    if DEVICE == "cpu":
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) / len(calls) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[0]()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    graph.replay()
    torch.cuda.synchronize()
    for out, ref in zip(outs, check_against):
        if not torch.equal(out, ref):
            fail("CUDA graph replay differs from the eager call")
            break
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth_tbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read and written."""
    if DEVICE == "cpu":
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * x.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e12


# ---------------------------------------------------------------- inputs

def num_copies(weight_bytes: int) -> int:
    return 1 if DEVICE == "cpu" else max(2, math.ceil(L2_MARGIN_BYTES / weight_bytes))


def dense_weights(n: int, k: int, copies: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(n + k)
    return [(torch.randn(n, k, device=DEVICE, generator=gen) * 0.02).to(torch.bfloat16)
            for _ in range(copies)]


def packed_weights(n: int, k: int, copies: int) -> list[tuple[torch.Tensor, ...]]:
    """Random AWQ tensors: every int32 bit pattern is eight valid codes."""
    gen = torch.Generator(device=DEVICE).manual_seed(n * 3 + k)
    out = []
    for _ in range(copies):
        qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32,
                                device=DEVICE, generator=gen)
        qzeros = torch.randint(-2**31, 2**31 - 1, (k // GROUP, n // 8), dtype=torch.int32,
                               device=DEVICE, generator=gen)
        scales = (torch.rand(k // GROUP, n, device=DEVICE, generator=gen) * 0.004
                  + 0.001).to(torch.float16)
        out.append((qweight, qzeros, scales))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------- one shape

def time_config(run: Callable[[int], torch.Tensor], copies: int, ref: torch.Tensor,
                label: str, tol: float) -> float:
    """Checks ``run(0)`` against ``ref``, then times ``run`` over the weight copies."""
    num_calls = copies if DEVICE == "cpu" else max(copies, CALLS_PER_GRAPH)
    eager = [run(i % copies) for i in range(num_calls)]
    err = rel_err(eager[0], ref)
    if not err <= tol:
        fail(f"{label}: max error {err:.2e} of max |ref| (tol {tol:.1e})")
    return per_call_us([lambda i=i: run(i % copies) for i in range(len(eager))], eager)


def bench_bf16(n: int, k: int, m: int, weights: list[torch.Tensor], x: torch.Tensor,
               sweep: bool, label: str) -> dict:
    from kvflow.kernels import gemv as kernels

    ref = x.float() @ weights[0].float().t()
    copies = len(weights)
    row = {"cublas": time_config(lambda i: F.linear(x, weights[i]), copies, ref,
                                 f"{label} F.linear", TOL[x.dtype])}
    default = kernels.default_gemv_config(m, n, k, x.dtype, x.device)
    row["default"] = time_config(lambda i: kernels.gemv(x, weights[i], config=default), copies,
                                 ref, f"{label} gemv {default}", TOL[x.dtype])
    row["default_cfg"] = asdict(default)
    if not sweep:
        return row
    results = []
    for base, splits in bf16_candidates(m):
        for split in splits:
            cfg = replace(base, split_k=split)
            t = time_config(lambda i: kernels.gemv(x, weights[i], config=cfg), copies, ref,
                            f"{label} gemv {cfg}", TOL[x.dtype])
            results.append((t, cfg))
    results.sort(key=lambda r: r[0])
    best_t, best = results[0]
    row["best"], row["best_cfg"] = best_t, asdict(best)
    row["sweep"] = [(t, asdict(c)) for t, c in results]
    half = x.half()
    err = rel_err(kernels.gemv(half, weights[0].half(), config=best),
                  half.float() @ weights[0].half().float().t())
    if not err <= TOL[torch.float16]:
        fail(f"{label} fp16 gemv {best}: max error {err:.2e}")
    print(f"  sweep bf16 {label}: cuBLAS {row['cublas']:.1f} | default {row['default']:.1f} | "
          + " ".join(f"{t:.1f}:{_short(c)}" for t, c in results[:4]), flush=True)
    return row


def bench_awq(n: int, k: int, m: int, packed: list[tuple[torch.Tensor, ...]],
              x: torch.Tensor, sweep: bool, label: str) -> dict:
    from kvflow.kernels import awq_gemm as kernels

    weight = kernels.awq_dequantize(*packed[0], torch.float32)
    ref = x.float() @ weight.t()
    del weight
    copies = len(packed)
    row = {"dequant_cublas": time_config(
        lambda i: F.linear(x, kernels.awq_dequantize(*packed[i], x.dtype)), copies, ref,
        f"{label} dequant+F.linear", TOL[x.dtype])}
    default = kernels.default_gemm_config(m, n, k, GROUP, x.device)
    row["default"] = time_config(lambda i: kernels.awq_gemm(x, *packed[i], config=default),
                                 copies, ref, f"{label} awq {default}", TOL[x.dtype])
    row["default_cfg"] = asdict(default)
    if not sweep:
        return row
    results = []
    for base, splits in awq_candidates(m):
        for split in splits:
            cfg = replace(base, split_k=split)
            t = time_config(lambda i: kernels.awq_gemm(x, *packed[i], config=cfg), copies, ref,
                            f"{label} awq {cfg}", TOL[x.dtype])
            results.append((t, cfg))
    results.sort(key=lambda r: r[0])
    row["best"], row["best_cfg"] = results[0][0], asdict(results[0][1])
    row["sweep"] = [(t, asdict(c)) for t, c in results]
    print(f"  sweep awq {label}: default {row['default']:.1f} | "
          + " ".join(f"{t:.1f}:{_short(c)}" for t, c in results[:4]), flush=True)
    return row


def _short(cfg) -> str:
    d = asdict(cfg)
    kind = ("tc" if d.get("use_tensor_cores") or d.get("use_dot") else "fma")
    return f"{kind}{d['block_n']}x{d['block_k']}s{d['split_k']}w{d['num_warps']}p{d['num_stages']}"


def bench_int4pack(n: int, k: int, packed: list[tuple[torch.Tensor, ...]], x: torch.Tensor,
                   label: str) -> Optional[float]:
    """tinygemm on the repack of each AWQ copy; None where it cannot take the shape."""
    from kvflow.kernels import awq_gemm as kernels
    from kvflow.quantization import awq_int4pack

    reason = awq_int4pack.unsupported_reason(k, n, GROUP, x.dtype, x.device)
    if reason is not None:
        print(f"  {label}: no int4pack ({reason})", flush=True)
        return None
    weight = kernels.awq_dequantize(*packed[0], torch.float32)
    ref = x.float() @ weight.t()
    del weight
    repacked = [awq_int4pack.convert_awq(*p, GROUP) for p in packed]
    return time_config(lambda i: awq_int4pack.int4pack_linear(x, repacked[i]), len(repacked),
                       ref, f"{label} int4pack", TOL[x.dtype])


def run_int4pack(shapes: dict, tokens: tuple[int, ...], json_path: Optional[str]) -> list[dict]:
    """cuBLAS bf16, Triton int4 and tinygemm int4 per AWQ shape and M."""
    rows = []
    for model, layers in shapes.items():
        for name, n, k in layers:
            if name == "lm_head":  # AWQ checkpoints keep it in bf16
                continue
            label = f"{model}.{name}"
            dense = dense_weights(n, k, num_copies(n * k * 2))
            packed = packed_weights(n, k, num_copies(n * k // 2))
            for m in tokens:
                x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
                ref = x.float() @ dense[0].float().t()
                cublas = time_config(lambda i: F.linear(x, dense[i]), len(dense), ref,
                                     f"{label} M={m} F.linear", TOL[x.dtype])
                triton_int4 = bench_awq(n, k, m, packed, x, False, f"{label} M={m}")["default"]
                tiny = bench_int4pack(n, k, packed, x, f"{label} M={m}")
                rows.append({"shape": label, "n": n, "k": k, "m": m, "cublas": cublas,
                             "triton_int4": triton_int4, "int4pack": tiny})
                print(f"  {label} M={m}: cuBLAS {cublas:.1f} | triton int4 {triton_int4:.1f} | "
                      f"int4pack {'-' if tiny is None else f'{tiny:.1f}'} us", flush=True)
            del dense, packed
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            if json_path:
                with open(json_path, "w", encoding="utf-8") as f:
                    json.dump(rows, f)
    return rows


def print_int4pack_table(rows: list[dict]) -> None:
    def us(t: Optional[float]) -> str:
        return "-" if t is None else f"{t:.1f}"

    def ratio(a: float, b: Optional[float]) -> str:
        return "-" if b is None else f"{a / b:.2f}x"

    print("\n| shape | N | K | M | bf16 F.linear us | Triton int4 us | int4pack us "
          "| int4pack vs Triton | int4pack vs bf16 | int4pack TB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, k, m, tiny = r["n"], r["k"], r["m"], r["int4pack"]
        nbytes = n * k // 2 + (k // GROUP) * n * 4 + (m * k + m * n) * 2
        tbs = "-" if tiny is None else f"{nbytes / (tiny * 1e-6) / 1e12:.2f}"
        print(f"| {r['shape']} | {n} | {k} | {m} | {r['cublas']:.1f} | {r['triton_int4']:.1f} "
              f"| {us(tiny)} | {ratio(r['triton_int4'], tiny)} | {ratio(r['cublas'], tiny)} "
              f"| {tbs} |")


# ---------------------------------------------------------------- compile ahead

def _warm_worker(jobs: list[tuple[str, int, dict]]) -> int:
    """Compiles configs in a separate process (Triton's disk cache is shared)."""
    from kvflow.kernels import awq_gemm, gemv

    torch.cuda.set_device(0)
    for kind, m, cfg in jobs:
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        if kind == "bf16":
            c = gemv.GemvConfig(**cfg)
            w = torch.randn(max(2 * c.block_n, 64), 4096, device="cuda", dtype=torch.bfloat16)
            gemv.gemv(torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16), w, config=c)
        else:
            c = awq_gemm.AWQGemmConfig(**cfg)
            n = max(2 * c.block_n, 64)
            packed = (torch.zeros(1024, n // 8, dtype=torch.int32, device="cuda"),
                      torch.zeros(1024 // GROUP, n // 8, dtype=torch.int32, device="cuda"),
                      torch.ones(1024 // GROUP, n, dtype=torch.float16, device="cuda"))
            awq_gemm.awq_gemm(x, *packed, config=c)
    torch.cuda.synchronize()
    return len(jobs)


def compile_ahead(tokens: tuple[int, ...], jobs: int) -> None:
    """Every swept config at split 1 and 2 (two kernels: direct and partial stores)."""
    work = []
    for m in sorted({1, 2} & set(tokens)):
        for kind, candidates in (("bf16", bf16_candidates(m)), ("awq", awq_candidates(m))):
            for base, _ in candidates:
                for split in (1, 2):
                    work.append((kind, m, asdict(replace(base, split_k=split))))
    start = time.perf_counter()
    chunks = [work[i::jobs] for i in range(jobs)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        done = sum(pool.map(_warm_worker, chunks))
    print(f"compiled {done} configs in {jobs} processes in {time.perf_counter() - start:.1f} s",
          flush=True)


# ---------------------------------------------------------------- main

def run(shapes: dict, tokens: tuple[int, ...], sweep: bool, json_path: Optional[str]
        ) -> list[dict]:
    """Measures every shape at every M; rewrites ``json_path`` after each shape."""
    rows = []
    for model, layers in shapes.items():
        for name, n, k in layers:
            label = f"{model}.{name}"
            dense = dense_weights(n, k, num_copies(n * k * 2))
            is_awq = name != "lm_head"  # AWQ checkpoints keep the LM head in bf16
            packed = packed_weights(n, k, num_copies(n * k // 2)) if is_awq else None
            for m in tokens:
                x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
                row = {"shape": label, "n": n, "k": k, "m": m,
                       "bf16": bench_bf16(n, k, m, dense, x, sweep, f"{label} M={m}")}
                if is_awq:
                    row["awq"] = bench_awq(n, k, m, packed, x, sweep, f"{label} M={m}")
                rows.append(row)
            del dense, packed
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            if json_path:
                with open(json_path, "w", encoding="utf-8") as f:
                    json.dump(rows, f)
    return rows


def print_table(rows: list[dict], copy_tbs: float) -> None:
    """gemv / awq columns: the shipped heuristic; "best" columns: the sweep's winner."""
    def tbs(nbytes: float, t: float) -> str:
        return f"{nbytes / (t * 1e-6) / 1e12:.2f}"

    def best(entry: dict) -> str:
        return f"{entry['best']:.1f}" if "best" in entry else "-"

    print(f"\ncopy bandwidth: {copy_tbs:.2f} TB/s (read + write)\n")
    print("| shape | N | K | M | F.linear us | TB/s | gemv us | TB/s | vs F.linear | gemv best us "
          "| awq int4 us | TB/s | vs bf16 F.linear | awq best us | dequant+F.linear us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, k, m = r["n"], r["k"], r["m"]
        io = (m * k + m * n) * 2
        dense_bytes = n * k * 2 + io
        b = r["bf16"]
        cells = [r["shape"], str(n), str(k), str(m), f"{b['cublas']:.1f}",
                 tbs(dense_bytes, b["cublas"]), f"{b['default']:.1f}",
                 tbs(dense_bytes, b["default"]), f"{b['cublas'] / b['default']:.2f}x", best(b)]
        if "awq" in r:
            a = r["awq"]
            int4_bytes = n * k // 2 + (k // GROUP) * n * 2 + (k // GROUP) * n // 2 + io
            cells += [f"{a['default']:.1f}", tbs(int4_bytes, a["default"]),
                      f"{b['cublas'] / a['default']:.2f}x", best(a), f"{a['dequant_cublas']:.1f}"]
        else:
            cells += ["-"] * 5
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B, M=1,4, no sweep")
    ap.add_argument("--smoke", action="store_true", help="toy shapes on CPU (interpreter)")
    ap.add_argument("--json", help="write every measurement (sweeps included) here")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling the sweep ahead")
    ap.add_argument("--int4pack", action="store_true",
                    help="AWQ shapes: bf16 cuBLAS vs Triton int4 vs tinygemm (no sweep)")
    args = ap.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment.")
            return 2
        DEVICE = "cpu"
        shapes, tokens, sweep = SMOKE_SHAPES, (1, 3), False
    elif not torch.cuda.is_available():
        print("bench_gemv.py needs a CUDA GPU (or --smoke).")
        return 2
    else:
        shapes = {"llama3-8b": SHAPES["llama3-8b"]} if args.quick else SHAPES
        tokens, sweep = ((1, 4) if args.quick else TOKENS), not args.quick
    import triton

    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (interpreter)"
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    if args.int4pack:
        int4_shapes = shapes if args.smoke else {"llama3-8b": SHAPES["llama3-8b"]}
        start = time.perf_counter()
        rows = run_int4pack(int4_shapes, tokens if args.smoke else TOKENS, args.json)
        print(f"measured in {time.perf_counter() - start:.0f} s", flush=True)
        print_int4pack_table(rows)
        return report_failures()
    if sweep and args.jobs > 1:
        compile_ahead(tokens, args.jobs)
    copy_tbs = copy_bandwidth_tbs()
    start = time.perf_counter()
    rows = run(shapes, tokens, sweep, args.json)
    print(f"measured in {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows, copy_tbs)
    return report_failures()


def report_failures() -> int:
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) failed:")
        for message in FAILURES[:20]:
            print(f"  {message}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
