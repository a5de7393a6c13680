"""What the multiprocess executor costs: tp=1 in-process versus tp=1 through a worker process.

    python benchmarks/tp_overhead.py                 # GPU, Llama-3.2-1B shape, batch 1 and 32
    python benchmarks/tp_overhead.py --tp 2          # adds a tp=2 row (needs 2 GPUs)
    python benchmarks/tp_overhead.py --tiny          # CPU smoke run of the script itself

Why: with one GPU, tensor parallelism cannot be measured, but its fixed cost
can. ``distributed_executor_backend="mp"`` with tp=1 runs the same single
model in a spawned worker, so the difference against ``"uni"`` is exactly
the per-step price of the protocol (pickling the SchedulerOutput, two pipe
hops, waking the driver), the price every tp>1 step also pays.

Decode is timed alone: a batch's requests are added and stepped until each
has its first token (prefill, untimed), then ``steps`` engine steps are
timed, then the requests are aborted. Random weights (``load_format="dummy"``),
token-id prompts and ``ignore_eos``, so every run produces the same tokens.
Prints a markdown table (for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

# Llama-3.2-1B's shape (config.json of meta-llama/Llama-3.2-1B, rope scaling left out:
# it changes no cost). Random weights: no download.
LLAMA_3_2_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                    torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001,
                    tie_word_embeddings=True, hidden_act="silu")
TINY = dict(LLAMA_3_2_1B, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1024,
            bos_token_id=1, eos_token_id=2)


@dataclass
class Result:
    executor: str
    tp: int
    batch: int
    tok_s: float
    ms_step: float


def write_config(shape: dict) -> str:
    path = tempfile.mkdtemp(prefix="kvflow-tp-overhead-")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(shape, f)
    return path


def decode_step_s(engine, prompts: list[list[int]], steps: int, tag: str) -> float:
    """Seconds per decode step of a batch: prefill first (untimed), then ``steps`` timed steps."""
    from kvflow import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    started: set[str] = set()
    while len(started) < len(ids):  # every request has its first token: decode only from here
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()  # returns sampled ids on the host: each step is synchronous
    elapsed = time.perf_counter() - start
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed / steps


def measure(model_dir: str, executor: str, tp: int, batches: list[int], args) -> list[Result]:
    from kvflow import LLM

    on_gpu = torch.cuda.is_available()
    llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16" if on_gpu else "float32",
              max_model_len=args.prompt_len + args.steps + 16, max_num_seqs=max(batches),
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
              tensor_parallel_size=tp, distributed_executor_backend=executor)
    engine = llm.llm_engine
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    rng = random.Random(0)
    results = []
    try:
        for batch in batches:
            def prompts() -> list[list[int]]:
                return [[rng.randrange(3, vocab) for _ in range(args.prompt_len)]
                        for _ in range(batch)]

            decode_step_s(engine, prompts(), 4, "warmup")  # kernels, graphs, allocator
            step_s = statistics.median(decode_step_s(engine, prompts(), args.steps, f"run{i}")
                                       for i in range(args.runs))
            results.append(Result(executor, tp, batch, batch / step_s, 1000 * step_s))
            print(f"  {executor} tp={tp} batch={batch}: {results[-1].tok_s:.1f} tok/s", flush=True)
    finally:
        engine.shutdown()
        del llm, engine
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke run)")
    parser.add_argument("--tp", type=int, default=1, help="also measure mp with this tp (>1)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="decode steps per measurement")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = parser.parse_args()
    shape = TINY if args.tiny else LLAMA_3_2_1B
    args.batches = args.batches or ([1, 4] if args.tiny else [1, 32])
    args.steps = args.steps or (16 if args.tiny else 128)
    model_dir = write_config(shape)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"Device: {device}; shape: {'tiny' if args.tiny else 'Llama-3.2-1B'}; "
          f"prompt {args.prompt_len} tokens, {args.steps} decode steps, median of {args.runs}")

    plan = [("uni", 1), ("mp", 1)] + ([("mp", args.tp)] if args.tp > 1 else [])
    results: list[Result] = []
    for executor, tp in plan:
        results += measure(model_dir, executor, tp, args.batches, args)

    base = {r.batch: r for r in results if r.executor == "uni"}
    print()
    print(f"Decode throughput on {device} ({'tiny' if args.tiny else 'Llama-3.2-1B'} shape, "
          "random weights)")
    print()
    print("| executor | tp | batch | decode tok/s | ms / step | vs uni tp=1 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ref = base[r.batch]
        delta = f"{r.ms_step - ref.ms_step:+.3f} ms ({r.tok_s / ref.tok_s:.3f}x)"
        print(f"| {r.executor} | {r.tp} | {r.batch} | {r.tok_s:.1f} | {r.ms_step:.3f} | "
              f"{'—' if r is ref else delta} |")


if __name__ == "__main__":
    main()
