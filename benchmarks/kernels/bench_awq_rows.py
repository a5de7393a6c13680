"""One-token AWQ int4 GEMVs side by side: the row-streaming kernel over AutoAWQ's own layout
(``kvflow.kernels.awq_gemv_rows``), the K-packed GEMV (``awq_gemv``) and tinygemm.

    python benchmarks/kernels/bench_awq_rows.py [--model llama2-7b|llama3-8b] [--sweep]
                                                [--configs "T,R,V,S;..."] [--json PATH]
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_awq_rows.py --smoke   # CPU dry run

Per linear of the model (group 128, M = 1), microseconds per call inside a CUDA graph
(``bench_gemv.per_call_us``: the graph cycles through enough weight copies to miss L2):

  tinygemm   ``torch._weight_int4pack_mm`` (bfloat16 x; it has no float16 kernel)
  kpack      ``awq_gemv`` with its shipped tile (float16 x)
  rows       ``awq_gemv_rows`` with its shipped tile (float16 x)
  sweep      (``--sweep``) ``awq_gemv_rows`` over ``candidates()`` (T words a thread,
             R rows a warp a step, V warps, S splits); ``--configs`` names them instead

Every output is checked against float32 torch on the exactly dequantized weight (exit
status 1 on a mismatch) and graph replays must equal eager calls. TB/s counts codes,
scales (2 bytes), zeros (half a byte), x and y; % is of the device's copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gemv as bg  # noqa: E402  (timing, inputs and failure bookkeeping)
from bench_awq_gemv import GROUP, MODEL_SHAPES, SMOKE_SHAPES  # noqa: E402

TOL = 4e-3  # of max |reference|: one float16 rounding of the output, with margin


def candidates(explicit: tuple[tuple[int, ...], ...] = ()) -> list:
    """(words, rows, warps, split) tiles of the sweep."""
    from kvflow.kernels.awq_gemv_rows import AWQGemvRowsConfig

    if explicit:
        return [AWQGemvRowsConfig(words=t, rows=r, warps=v, split_k=s) for t, r, v, s in explicit]
    tiles = [(t, r, v) for t in (2, 4) for r in (8, 16) for v in (4, 8)] + [(1, 16, 8)]
    return [AWQGemvRowsConfig(words=t, rows=r, warps=v, split_k=s)
            for t, r, v in tiles for s in (1, 2, 4, 8, 16)]


def _warm(cfgs: list[dict]) -> int:
    """Compiles tiles in a child process (fills Triton's on-disk cache): one split and
    two (the direct and the partial-sum kernel)."""
    from kvflow.kernels.awq_gemv_rows import AWQGemvRowsConfig, awq_gemv_rows, nibble_major_scales

    qweight, qzeros, scales = bg.packed_weights(2048, 2048, 1)[0]
    by_nibble = nibble_major_scales(scales)
    x = torch.randn(1, 2048, device="cuda").to(torch.float16)
    for cfg in cfgs:
        for split in (1, 2):
            c = AWQGemvRowsConfig(**{**cfg, "split_k": split})
            awq_gemv_rows(x, qweight, qzeros, by_nibble, GROUP, config=c)
    torch.cuda.synchronize()
    return len(cfgs)


def compile_ahead(cands: list, num_jobs: int) -> None:
    from dataclasses import asdict

    tiles = {tuple(sorted({**asdict(c), "split_k": 1}.items())) for c in cands}
    jobs = [dict(t) for t in sorted(tiles)]
    chunks = [jobs[i::num_jobs] for i in range(num_jobs)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_jobs, mp_context=ctx) as pool:
        done = sum(pool.map(_warm, [c for c in chunks if c]))
    print(f"compiled {done} tiles ahead", flush=True)


def run(shapes, cands: list, copy_tbs: float) -> list[dict]:
    from kvflow.kernels.awq_gemv import awq_gemv
    from kvflow.kernels.awq_gemv_rows import (awq_gemv_rows, default_rows_config,
                                              nibble_major_scales, rows_unsupported_reason)
    from kvflow.quantization import awq_format, awq_int4pack, awq_kpack

    rows = []
    for name, n, k in shapes:
        copies = bg.num_copies(n * k // 2)
        packed = bg.packed_weights(n, k, copies) if bg.DEVICE == "cuda" else [
            awq_format.quantize(torch.randn(n, k), GROUP)]
        by_nibble = [nibble_major_scales(p[2]) for p in packed]
        kpacks = [awq_kpack.convert_awq(*p) for p in packed]
        has_tiny = bg.DEVICE == "cuda" and awq_int4pack.unsupported_reason(
            k, n, GROUP, torch.bfloat16, torch.device(bg.DEVICE)) is None
        tinies = [awq_int4pack.convert_awq(*p, GROUP) for p in packed] if has_tiny else []
        weight = awq_format.dequantize(*packed[0], torch.float32)  # [N, K]
        num_bytes = n * k // 2 + n * (k // GROUP) * 5 // 2 + 2 * (n + k)
        x = torch.randn(1, k, device=bg.DEVICE).to(torch.float16)
        ref = x.float() @ weight.t()
        label = f"{name} {n}x{k}"

        def rows_call(i, cfg=None):
            return awq_gemv_rows(x, packed[i][0], packed[i][1], by_nibble[i], GROUP, config=cfg)

        row = {"shape": name, "n": n, "k": k, "bytes": num_bytes}
        if has_tiny:
            xb = x.to(torch.bfloat16)
            row["tinygemm"] = bg.time_config(lambda i: awq_int4pack.int4pack_linear(xb, tinies[i]),
                                             copies, xb.float() @ weight.t(),
                                             f"{label} tinygemm", 1.6e-2)
        row["kpack"] = bg.time_config(
            lambda i: awq_gemv(x, kpacks[i].words, kpacks[i].scales_zeros, GROUP), copies, ref,
            f"{label} kpack", TOL)
        row["rows_config"] = str(default_rows_config(n, k, GROUP))
        row["rows"] = bg.time_config(rows_call, copies, ref, f"{label} rows", TOL)
        swept = []
        for cand in cands:
            if rows_unsupported_reason(k, n, GROUP, cand) or k // cand.split_k < 128:
                continue
            t = bg.time_config(lambda i, c=cand: rows_call(i, c), copies, ref,
                               f"{label} rows {cand}", TOL)
            swept.append((t, str(cand)))
        swept.sort()
        row["sweep"] = swept
        if swept:
            print(f"  {label} sweep (best 8): "
                  + "; ".join(f"{t:.1f} {c}" for t, c in swept[:8]), flush=True)
        print(f"{label}: tinygemm {row.get('tinygemm', float('nan')):.1f} | kpack "
              f"{row['kpack']:.1f} | rows {row['rows']:.1f} us "
              f"({num_bytes / row['rows'] / 1e6:.2f} TB/s, "
              f"{100 * num_bytes / row['rows'] / 1e6 / copy_tbs:.0f}% of copy)", flush=True)
        rows.append(row)
        del packed, kpacks, tinies, by_nibble
        if bg.DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], copy_tbs: float) -> None:
    print(f"\ncopy bandwidth {copy_tbs:.2f} TB/s\n")
    print("| matrix | tinygemm us | kpack us | rows us | rows TB/s | best swept us (tile) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        best = f"{r['sweep'][0][0]:.1f} ({r['sweep'][0][1]})" if r["sweep"] else "-"
        tiny = r.get("tinygemm")
        print(f"| {r['shape']} {r['n']}x{r['k']} | {'-' if tiny is None else f'{tiny:.1f}'} | "
              f"{r['kpack']:.1f} | {r['rows']:.1f} | {r['bytes'] / r['rows'] / 1e6:.2f} | {best} |")
    for key in ("tinygemm", "kpack", "rows"):
        if all(r.get(key) for r in rows):
            print(f"four linears a layer, {key}: {sum(r[key] for r in rows):.1f} us")
    if all(r["sweep"] for r in rows):
        print(f"four linears a layer, best swept: {sum(r['sweep'][0][0] for r in rows):.1f} us")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--configs", default="", help="explicit sweep: 'T,R,V,S;...'")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="toy shapes on CPU (interpreter)")
    args = ap.parse_args()
    explicit = tuple(tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c)
    cands = candidates(explicit) if (args.sweep or explicit) else []
    if args.smoke or not torch.cuda.is_available():
        bg.DEVICE = "cpu"
        cands = cands[:2]
    shapes = SMOKE_SHAPES[:1] if args.smoke else MODEL_SHAPES[args.model]
    copy_tbs = bg.copy_bandwidth_tbs()
    if bg.DEVICE == "cuda":
        print(torch.cuda.get_device_name(), f"copy {copy_tbs:.2f} TB/s", flush=True)
        if cands:
            compile_ahead(cands, args.jobs)
    rows = run(shapes, cands, copy_tbs)
    print_table(rows, copy_tbs)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"copy_tbs": copy_tbs, "rows": rows}, f)
    return bg.report_failures()


if __name__ == "__main__":
    sys.exit(main())
