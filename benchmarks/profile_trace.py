"""Where the GPU time goes: a torch.profiler trace summarised as a small markdown table.

    python benchmarks/profile_trace.py [--shape llama3-8b] [--quick]
    python benchmarks/profile_trace.py --shape tiny --device cpu   # CPU dry run (aten ops)
    python benchmarks/profile_trace.py --model DIR [--dtype float16] --skip-t1 --top 30
        # a checkpoint on disk instead of random weights (awq_bench.py's AWQ one)

Two regions, each traced after a warm-up: L1 decode steps (batch 1, prompt 512,
``--l1-steps`` engine steps after the prefill) and a T1 run (``LLM.generate`` of the
T1 requests). For each: the region's host wall time, and as shares of it the GPU time
in GEMM/GEMV kernels, attention kernels (paged attention, KV-cache writes, split
reductions, flash/SDPA), other kernels, memory copies/sets, and the host gaps (no
kernel running on the GPU: the GPU waits for the host). Shares come from the union of
kernel intervals, so overlapping kernels are not counted twice. The profiler slows the
host side down somewhat, so gaps are an upper bound; kernel times are the GPU's own.
``gpu_suite.py --trace`` runs the same for its shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_GEMM = re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|matmul|aten::(mm|addmm|bmm|linear)$",
                   re.IGNORECASE)
_ATTENTION = re.compile(r"attention|attn|flash|fmha|kv_splits|sum_splits|write_kv_cache|"
                        r"scaled_dot_product", re.IGNORECASE)
_COPY = re.compile(r"^(memcpy|memset)|aten::(copy_|fill_|zero_)$", re.IGNORECASE)
CATEGORIES = ("GEMM", "attention", "other kernels", "copies")


def classify(name: str) -> str:
    if _COPY.search(name):
        return "copies"
    if _ATTENTION.search(name):
        return "attention"
    if _GEMM.search(name):
        return "GEMM"
    return "other kernels"


@dataclass
class TraceSummary:
    region: str
    wall_ms: float
    """Host wall time of the region (per step where ``steps`` > 1)."""
    busy_ms: dict[str, float]
    """GPU time per category (union of that category's kernel intervals), same unit."""
    gaps_ms: float
    """Wall time with no kernel running, same unit."""
    num_kernels: int
    top: list[tuple[str, float, int]]
    """Kernels by summed GPU time: (name, ms per step, launches), longest first."""


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _kernel_events(prof, device: str) -> list:
    """Device kernels/copies on the GPU; on CPU (dry runs) the outermost aten ops."""
    events = prof.events()
    if device == "cuda":
        return [e for e in events if e.device_type == DeviceType.CUDA]
    return [e for e in events if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


def trace(region: str, fn: Callable[[], None], device: str, steps: int = 1) -> TraceSummary:
    """Runs ``fn`` under the profiler and sums its kernels per category."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = _kernel_events(prof, device)
    per_cat: dict[str, list[tuple[float, float]]] = {c: [] for c in CATEGORIES}
    for e in kernels:
        per_cat[classify(e.name)].append((e.time_range.start, e.time_range.end))
    busy = {c: _union_us(iv) / 1e3 / steps for c, iv in per_cat.items()}
    all_busy = _union_us([iv for ivs in per_cat.values() for iv in ivs]) / 1e3 / steps
    wall_ms = wall_us / 1e3 / steps
    per_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = per_name.setdefault(e.name, [0.0, 0])
        entry[0] += (e.time_range.end - e.time_range.start) / 1e3 / steps
        entry[1] += 1
    top = sorted(((n, ms, int(c)) for n, (ms, c) in per_name.items()), key=lambda t: -t[1])
    return TraceSummary(region, wall_ms, busy, max(0.0, wall_ms - all_busy), len(kernels), top)


def print_table(summaries: list[TraceSummary]) -> None:
    print("\n| region | wall ms | " + " | ".join(f"{c} %" for c in CATEGORIES)
          + " | host gaps (GPU idle) % | kernels |")
    print("|---|---|" + "---|" * (len(CATEGORIES) + 2))
    for s in summaries:
        shares = " | ".join(f"{100 * s.busy_ms[c] / s.wall_ms:.1f}" for c in CATEGORIES)
        print(f"| {s.region} | {s.wall_ms:.2f} | {shares} | {100 * s.gaps_ms / s.wall_ms:.1f} | "
              f"{s.num_kernels} |", flush=True)


def print_top(summaries: list[TraceSummary], count: int) -> None:
    """The ``count`` kernels with the most GPU time per region (names cut to 90 chars)."""
    for s in summaries:
        print(f"\n{s.region}: top kernels by GPU time\n\n| kernel | ms | % of wall | launches |"
              "\n|---|---|---|---|")
        for name, ms, launches in s.top[:count]:
            print(f"| `{name[:90]}` | {ms:.2f} | {100 * ms / s.wall_ms:.1f} | {launches} |")


def trace_l1(llm, device: str, token_id_max: int, steps: int) -> TraceSummary:
    """``steps`` decode steps of one request (prompt 512), after its prefill."""
    import random

    from kvflow import SamplingParams

    engine = llm.llm_engine
    rng = random.Random(0)
    prompt = [rng.randrange(1000, token_id_max) for _ in range(512)]
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True,
                            detokenize=False)
    llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)  # warm-up
    engine.add_request("trace-l1", {"prompt_token_ids": prompt}, params)
    for _ in range(3):  # the prefill, and (asynchronously scheduled) its output
        engine.step()

    def decode() -> None:
        for _ in range(steps):
            engine.step()

    summary = trace(f"L1 decode step (mean of {steps})", decode, device, steps)
    while engine.has_unfinished_requests():
        engine.step()
    return summary


def trace_t1(llm, device: str, requests: list[list[int]], max_tokens: int) -> TraceSummary:
    from kvflow import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    prompts = [{"prompt_token_ids": r} for r in requests]
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    llm.llm_engine.scheduler.kv_cache_manager.pool.reset_prefix_cache()
    return trace(f"T1 run ({len(requests)} requests x {max_tokens} tokens)",
                 lambda: llm.generate(prompts, params, use_tqdm=False), device)


def run_traces(model_dir: str, device: str, token_id_max: int, *, l1_steps: int,
               t1_requests: list[list[int]], t1_tokens: int, load_format: str = "dummy",
               dtype: str = "", skip_t1: bool = False) -> list[TraceSummary]:
    """Both regions, each with its own engine (L1's settings, then T1's), freed after."""
    from kvflow import LLM

    common = dict(load_format=load_format, skip_tokenizer_init=True, seed=0, device=device,
                  dtype=dtype or ("bfloat16" if device == "cuda" else "float32"),
                  max_model_len=2048)
    llm = LLM(model_dir, max_num_seqs=8, **common)
    llm.llm_engine.scheduler.kv_cache_manager.enable_caching = False
    summaries = [trace_l1(llm, device, token_id_max, l1_steps)]
    del llm
    gc.collect()
    if skip_t1:
        return summaries
    llm = LLM(model_dir, max_num_seqs=256, **common)
    summaries.append(trace_t1(llm, device, t1_requests, t1_tokens))
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return summaries


def main() -> None:
    from gpu_suite import SHAPES, t1_requests

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="T1 region: 32 requests x 64 tokens")
    ap.add_argument("--l1-steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=0, help="also list the N longest kernels")
    ap.add_argument("--model", default=None,
                    help="a checkpoint folder to load (default: random weights of --shape)")
    ap.add_argument("--dtype", default="", help="engine dtype (default bfloat16 on CUDA)")
    ap.add_argument("--skip-t1", action="store_true", help="trace the L1 region only")
    args = ap.parse_args()
    if args.model:
        with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        model_dir = args.model
    else:
        cfg = SHAPES[args.shape]
        model_dir = tempfile.mkdtemp(prefix="kvflow-trace-")
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(cfg, f)
    token_id_max = min(100000, cfg["vocab_size"])
    n, tokens = (32, 64) if args.quick or args.device == "cpu" else (128, 256)
    reqs = [[t % token_id_max for t in r] for r in t1_requests(n)]
    summaries = run_traces(model_dir, args.device, token_id_max, l1_steps=args.l1_steps,
                           t1_requests=reqs, t1_tokens=tokens,
                           load_format="auto" if args.model else "dummy", dtype=args.dtype,
                           skip_t1=args.skip_t1)
    print_table(summaries)
    if args.top:
        print_top(summaries, args.top)


if __name__ == "__main__":
    main()
