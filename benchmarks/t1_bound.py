"""How fast T1 can be on one GPU when kernels run one at a time: a cost model, no GPU.

    python benchmarks/t1_bound.py [--copy-tbs 3.0] [--peak-tflops 800] [--hf 460]

T1 (BENCHMARKS.md): 128 requests, prompts uniform in [100, 1024] (random.seed(0)), 256
new tokens each, Llama-3-8B in bf16. The model replays kvflow's scheduling rule (every
running decode first, then prefill chunks FCFS up to a token budget) step by step and
charges each step

    GEMMs      max(weights / bandwidth, tokens * 2 * params / peak)   weights read once
    attention  sum over decodes of context * KV bytes per token / bandwidth
    overhead   a fixed host/launch cost per step

in sequence, as a step's kernels run. Two parameter sets: ``measured`` (the efficiencies
the fourth and fifth sessions read inside T1 on an H100: GEMMs at 2.6 TB/s and 680
TFLOP/s, decode attention at 2.3 TB/s, 0.3 ms a step), which reproduces the measured
7,050-7,134 out tok/s, and ``ideal`` (every kernel at the machine's measured ceilings,
no overhead): the most any one-kernel-at-a-time engine gets, whatever the budget.
Prefill attention FLOPs (~2% of a prompt's) are left out, which only raises the bound.

What it shows (and why T1 >= 20x HF is not a kernel-tuning goal): at the H100's
ceilings the bound is ~8,600 out tok/s, 18.7x of HF's 460 (17.3x of 497). Past it
needs memory-bound decode attention to run *while* compute-bound GEMMs run (nano-batches
on concurrent streams, as NanoFlow does), or fewer KV bytes (an fp8 KV cache: ~9,900
ideal, ~8,200 at today's efficiencies).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

NUM_REQUESTS = 128
OUTPUT_LEN = 256
PARAMS = 8.03e9  # Llama-3-8B
WEIGHT_BYTES = 15.0e9  # read per step (all but the embedding table), bf16
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head size x (k, v) x bf16


@dataclass(frozen=True)
class Costs:
    """Rates the model charges a step at."""

    gemm_tbs: float
    peak_tflops: float
    attention_tbs: float
    step_overhead_s: float
    kv_bytes_per_token: int = KV_BYTES_PER_TOKEN


def prompt_lens() -> list[int]:
    """T1's prompt lengths, drawn as gpu_suite.py draws them."""
    random.seed(0)
    return [random.randint(100, 1024) for _ in range(NUM_REQUESTS)]


def simulate(costs: Costs, budget: int) -> float:
    """Seconds for T1 under budget scheduling (decodes first, then FCFS prefill chunks)."""
    prompts = prompt_lens()
    waiting = list(range(NUM_REQUESTS))
    prefilled: dict[int, int] = {}  # request -> prompt tokens computed
    generated: dict[int, int] = {}  # request -> tokens out (set once its prompt is done)
    running: list[int] = []
    seconds = 0.0
    while waiting or running:
        decodes = [r for r in running if r in generated]
        context = sum(prompts[r] + generated[r] for r in decodes)
        left = budget - len(decodes)
        chunk = 0
        for r in [r for r in running if r not in generated] + list(waiting):
            if left <= 0:
                break
            if r in waiting:
                waiting.remove(r)
                running.append(r)
                prefilled[r] = 0
            take = min(left, prompts[r] - prefilled[r])
            prefilled[r] += take
            left -= take
            chunk += take
        tokens = len(decodes) + chunk
        gemm = max(WEIGHT_BYTES / (costs.gemm_tbs * 1e12),
                   tokens * 2 * PARAMS / (costs.peak_tflops * 1e12))
        attention = context * costs.kv_bytes_per_token / (costs.attention_tbs * 1e12)
        seconds += gemm + attention + costs.step_overhead_s
        for r in decodes:
            generated[r] += 1
        for r in list(running):
            if r not in generated and prefilled[r] == prompts[r]:
                generated[r] = 1  # the prefill step samples the first token
            elif r in generated and generated[r] >= OUTPUT_LEN:
                running.remove(r)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copy-tbs", type=float, default=3.0, help="measured copy bandwidth")
    ap.add_argument("--peak-tflops", type=float, default=800.0, help="measured bf16 matmul")
    ap.add_argument("--hf", type=float, default=460.0, help="HF generate_batch out tok/s")
    args = ap.parse_args()
    sets = {
        "measured": Costs(2.6, 680.0, 2.3, 0.3e-3),
        "ideal": Costs(args.copy_tbs, args.peak_tflops, args.copy_tbs, 0.0),
        "ideal, fp8 KV": Costs(args.copy_tbs, args.peak_tflops, args.copy_tbs, 0.0,
                               KV_BYTES_PER_TOKEN // 2),
    }
    total = NUM_REQUESTS * OUTPUT_LEN
    print(f"T1 goal: 20 x {args.hf:.0f} = {20 * args.hf:,.0f} out tok/s\n")
    print("| costs | budget 512 | 2048 | 8192 (default) | 16384 | x HF at 8192 |")
    print("|---|---|---|---|---|---|")
    for name, costs in sets.items():
        rates = {b: total / simulate(costs, b) for b in (512, 2048, 8192, 16384)}
        print(f"| {name} | " + " | ".join(f"{r:,.0f}" for r in rates.values())
              + f" | {rates[8192] / args.hf:.1f}x |")


if __name__ == "__main__":
    main()
