"""The K-packed AWQ int4 GEMV (``kvflow.kernels.awq_gemv``) against tinygemm, per Llama-3-8B linear.

    python benchmarks/kernels/bench_awq_gemv.py [--sweep] [--tokens 1,2,4] [--json PATH]
                                                [--model llama3-8b|llama2-7b]
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_awq_gemv.py --smoke   # CPU dry run

For qkv, o, gate_up and down (group 128) at each M it times, per call inside a CUDA
graph (``bench_gemv.per_call_us``: the graph cycles through enough weight copies to
miss L2):

  tinygemm      ``torch._weight_int4pack_mm`` on ``awq_int4pack``'s repack (today's default)
  gemv          ``awq_gemv`` with the shipped config (``default_gemv_config``)
  gemv sweep    (``--sweep``) every config of ``candidates()`` (``--short-sweep``: a third;
                ``--configs``: an explicit list); the best is printed

TB/s counts the int4 codes, the scale/zero pairs (4 bytes a group and column), x and y;
% is of the device's copy bandwidth measured in the same run. Every kernel's output
is checked against float32 torch on the exactly dequantized weight (exit status 1 on
a mismatch), and graph replays must equal eager calls.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gemv as bg  # noqa: E402  (timing, inputs and failure bookkeeping)

MODEL_SHAPES = {  # (name, N, K) of the four linears a layer
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                  ("down", 4096, 14336)],
    "llama2-7b": [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096),
                  ("down", 4096, 11008)],
}
SMOKE_SHAPES = [("a", 96, 512), ("b", 40, 384)]
GROUP = 128
TOL = 1.6e-2  # of max |reference|: one bf16 rounding of the output, with margin


def candidates(short: bool = False, explicit: tuple[tuple[int, ...], ...] = ()):
    """(block_n, block_k, num_warps, num_stages) x splits of the sweep; ``short`` keeps a
    third (``--short-sweep``, for a short device lease), ``explicit`` (``--configs``:
    (block_n, block_k, split, warps, stages) each) replaces the lists below.

    The first tiles walk long K runs (a few splits); the second set is the opposite
    regime -- many short programs, one or two K steps each, for memory-level
    parallelism over per-program work (the shape of GemLite's batch-1 "RevSplitK"
    GEMV; here the splits are still summed in a fixed order, not by float atomics)."""
    from kvflow.kernels.awq_gemv import AWQGemvConfig

    if explicit:
        return [AWQGemvConfig(*c) for c in explicit]
    long_k = [(16, 1024, 4, 3), (16, 1024, 4, 4), (16, 1024, 4, 2), (16, 2048, 8, 3),
              (32, 1024, 8, 3), (8, 1024, 2, 3), (64, 256, 4, 3), (32, 512, 4, 3)]
    short_k = [(16, 128, 2, 1), (32, 128, 4, 1), (64, 128, 4, 1), (16, 256, 2, 2),
               (32, 256, 4, 2), (64, 256, 8, 2)]
    out = ([AWQGemvConfig(bn, bk, split, warps, stages)
            for bn, bk, warps, stages in long_k for split in (1, 2, 4)]
           + [AWQGemvConfig(bn, bk, split, warps, stages)
              for bn, bk, warps, stages in short_k for split in (8, 16, 32)])
    return out[::3] if short else out


def _warm(jobs: list[tuple[int, dict]]) -> int:
    """Compiles configs in a child process (fills Triton's on-disk cache)."""
    from kvflow.kernels.awq_gemv import AWQGemvConfig, awq_gemv
    from kvflow.quantization import awq_format, awq_kpack

    weight = torch.randn(64, 2048, device="cuda")
    kp = awq_kpack.convert_awq(*awq_format.quantize(weight, GROUP))
    for m, cfg in jobs:
        x = torch.randn(m, 2048, device="cuda").to(torch.bfloat16)
        awq_gemv(x, kp.words, kp.scales_zeros, kp.group_size, config=AWQGemvConfig(**cfg))
    torch.cuda.synchronize()
    return len(jobs)


def compile_ahead(tokens: tuple[int, ...], num_jobs: int, cands: list) -> None:
    """Every (M, config) of the sweep, compiled by ``num_jobs`` processes. The small
    warm-up shape specializes like the real ones (every size argument divisible by
    16); a split of 2048 inputs exercises the split and unsplit kernels."""
    from dataclasses import asdict

    jobs = [(m, asdict(cfg)) for m in tokens for cfg in cands if cfg.split_k <= 2]
    chunks = [jobs[i::num_jobs] for i in range(num_jobs)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_jobs, mp_context=ctx) as pool:
        done = sum(pool.map(_warm, [c for c in chunks if c]))
    print(f"compiled {done} (M, config) pairs ahead", flush=True)


def run(shapes, tokens: tuple[int, ...], cands: list, copy_tbs: float) -> list[dict]:
    """Times every shape at every M; sweeps ``cands`` (none: the shipped config only)."""
    from kvflow.kernels.awq_gemv import awq_gemv, default_gemv_config
    from kvflow.quantization import awq_format, awq_int4pack, awq_kpack

    rows = []
    for name, n, k in shapes:
        copies = bg.num_copies(n * k // 2)
        packed = bg.packed_weights(n, k, copies) if bg.DEVICE == "cuda" else [
            awq_format.quantize(torch.randn(n, k), GROUP)]
        kpacks = [awq_kpack.convert_awq(*p) for p in packed]
        has_tiny = awq_int4pack.unsupported_reason(k, n, GROUP, torch.bfloat16,
                                                   torch.device(bg.DEVICE)) is None
        tinies = [awq_int4pack.convert_awq(*p, GROUP) for p in packed] if has_tiny else []
        weight = awq_format.dequantize(*packed[0], torch.float32)  # [N, K]
        num_bytes_w = n * k // 2 + n * (k // GROUP) * 4
        for m in tokens:
            x = torch.randn(m, k, device=bg.DEVICE).to(torch.bfloat16)
            ref = x.float() @ weight.t()
            num_bytes = num_bytes_w + 2 * m * (n + k)
            label = f"{name} M={m}"

            def gemv(i, cfg=None):
                kp = kpacks[i]
                return awq_gemv(x, kp.words, kp.scales_zeros, kp.group_size, config=cfg)

            row = {"shape": name, "n": n, "k": k, "m": m, "bytes": num_bytes}
            row["tinygemm"] = bg.time_config(
                lambda i: awq_int4pack.int4pack_linear(x, tinies[i]), len(tinies), ref,
                f"{label} tinygemm", TOL) if has_tiny else None
            cfg = default_gemv_config(m, n, k, GROUP, x.device)
            row["gemv"] = bg.time_config(gemv, len(kpacks), ref, f"{label} gemv {cfg}", TOL)
            row["gemv_config"] = str(cfg)
            if cands:
                swept = []
                for cand in cands:
                    t = bg.time_config(lambda i, c=cand: gemv(i, c), len(kpacks), ref,
                                       f"{label} gemv {cand}", TOL)
                    swept.append((t, str(cand)))
                swept.sort()
                row["sweep"] = swept
                print(f"  {label} sweep (best 6): "
                      + "; ".join(f"{t:.1f} {c}" for t, c in swept[:6]), flush=True)
            tiny = row["tinygemm"]
            print(f"{label}: tinygemm {'-' if tiny is None else f'{tiny:.1f}'} us | gemv "
                  f"{row['gemv']:.1f} us ({num_bytes / row['gemv'] / 1e6:.2f} TB/s, "
                  f"{100 * num_bytes / row['gemv'] / 1e6 / copy_tbs:.0f}% of copy)",
                  flush=True)
            rows.append(row)
        del packed, kpacks, tinies
        if bg.DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], copy_tbs: float) -> None:
    print(f"\ncopy bandwidth {copy_tbs:.2f} TB/s\n")
    print("| matrix | M | tinygemm us | gemv us | gemv TB/s | % of copy | best swept us | vs tinygemm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tbs = r["bytes"] / r["gemv"] / 1e6
        best = f"{r['sweep'][0][0]:.1f}" if r.get("sweep") else "-"
        tiny = r["tinygemm"]
        ratio = f"{tiny / r['gemv']:.2f}x" if tiny else "-"
        print(f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {tiny if tiny is None else f'{tiny:.1f}'} "
              f"| {r['gemv']:.1f} | {tbs:.2f} | {100 * tbs / copy_tbs:.0f}% | {best} | {ratio} |")
    for m in sorted({r["m"] for r in rows}):
        sel = [r for r in rows if r["m"] == m]
        tiny = sum(r["tinygemm"] or 0 for r in sel)
        ours = sum(r["gemv"] for r in sel)
        print(f"M={m}: four linears a layer: tinygemm {tiny:.1f} us, gemv {ours:.1f} us")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="time every candidate config")
    ap.add_argument("--tokens", default="1,2,4")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling the sweep ahead")
    ap.add_argument("--smoke", action="store_true", help="toy shapes on CPU (interpreter)")
    ap.add_argument("--short-sweep", action="store_true", help="a third of the candidates")
    ap.add_argument("--configs", default="",
                    help="explicit sweep: 'block_n,block_k,split,warps,stages;...'")
    ap.add_argument("--model", default="llama3-8b", choices=sorted(MODEL_SHAPES),
                    help="whose four linears to time")
    args = ap.parse_args()
    tokens = tuple(int(t) for t in args.tokens.split(","))
    explicit = tuple(tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c)
    cands = candidates(args.short_sweep, explicit) if args.sweep and not args.smoke else []
    if args.smoke or not torch.cuda.is_available():
        bg.DEVICE = "cpu"
    shapes = SMOKE_SHAPES if args.smoke else MODEL_SHAPES[args.model]
    copy_tbs = bg.copy_bandwidth_tbs()
    if bg.DEVICE == "cuda":
        print(torch.cuda.get_device_name(), f"copy {copy_tbs:.2f} TB/s", flush=True)
        if args.sweep:
            compile_ahead(tokens, args.jobs, cands)
    rows = run(shapes, tokens, cands, copy_tbs)
    print_table(rows, copy_tbs)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"copy_tbs": copy_tbs, "rows": rows}, f)
    return bg.report_failures()


if __name__ == "__main__":
    sys.exit(main())
