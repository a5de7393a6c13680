"""Where T1's time goes, step by step: prefill-carrying steps against decode-only ones.

    python benchmarks/t1_steps.py [--shape llama3-8b] [--budgets 8192,16384]

For each token budget (``max_num_batched_tokens``), a child process runs T1 (128
requests, prompts uniform in [100, 1024], 256 new tokens) once to warm every step
shape, then again under ``KVFLOW_STEP_TRACE`` (kvflow/engine/step_trace.py). A step's
time is the gap between its tokens coming back and the previous step's (the engine is
GPU-bound here, and asynchronously scheduled). Printed per budget: out tok/s; the
prefill-carrying steps' count, time and prefill tokens per second (with the matmul
TFLOP/s that implies at 2 x params FLOPs a token); the decode-only steps' count, mean
batch and mean time. Why: the bound RESULTS.md derives for T1 splits the same way
(prefill compute, then ~256 dependent decode steps), so this shows which half is short
of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from gpu_suite import SHAPES, kvflow_llm, t1_requests  # noqa: E402


def child(shape: str, budget: int, trace: str, num_requests: int, out_len: int) -> None:
    import torch

    from kvflow import SamplingParams
    from kvflow.engine.step_trace import StepTrace

    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f)
    llm = kvflow_llm(folder, max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=budget)
    vocab = SHAPES[shape]["vocab_size"]
    reqs = [[t % vocab for t in r] for r in t1_requests(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True, detokenize=False)
    engine = llm.llm_engine
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for traced in (False, True):
        engine.scheduler.kv_cache_manager.pool.reset_prefix_cache()
        if traced:
            engine.step_trace = StepTrace(trace)
        sync()
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": r} for r in reqs], params, use_tqdm=False)
        sync()
        seconds = time.perf_counter() - start
    engine.step_trace.close()
    params_count = sum(p.numel() for p in engine.executor.worker.runner.model.parameters())
    print(json.dumps({"seconds": seconds, "out_tokens": len(reqs) * out_len,
                      "prompt_tokens": sum(map(len, reqs)), "params": params_count}))


def summarize(budget: int, info: dict, trace: str) -> str:
    steps = [json.loads(line) for line in open(trace)]
    prefill_s = decode_s = 0.0
    prefill_tokens = num_prefill = num_decode = decode_batch = 0
    decode_dts = []
    for prev, step in zip([None] + steps, steps):
        dt = step["done"] - (prev["done"] if prev else step["scheduled"])
        if step["tokens"] > step["single"]:
            num_prefill += 1
            prefill_s += dt
            prefill_tokens += step["tokens"] - step["single"]
        else:
            num_decode += 1
            decode_s += dt
            decode_batch += step["reqs"]
            decode_dts.append(dt)
    tflops = 2 * info["params"] * prefill_tokens / max(prefill_s, 1e-9) / 1e12
    return (f"| {budget} | {info['out_tokens'] / info['seconds']:.0f} | {info['seconds']:.2f} "
            f"| {num_prefill} | {prefill_s:.2f} | {prefill_tokens / max(prefill_s, 1e-9):.0f} "
            f"({tflops:.0f} TFLOP/s) | {num_decode} | {decode_s:.2f} "
            f"| {decode_batch / max(num_decode, 1):.0f} "
            f"| {1e3 * statistics.mean(decode_dts) if decode_dts else 0:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--budgets", default="8192,16384")
    ap.add_argument("--requests", type=int, default=128, help="fewer for a CPU dry run")
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--child", nargs=2, metavar=("BUDGET", "TRACE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.shape, int(args.child[0]), args.child[1], args.requests, args.out_len)
        return 0
    print("| budget | out tok/s | s | prefill-carrying steps | their s | prefill tok/s "
          "| decode-only steps | their s | mean batch | mean ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for budget in map(int, args.budgets.split(",")):
        trace = tempfile.mktemp(suffix=".jsonl")
        out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--requests",
                              str(args.requests), "--out-len", str(args.out_len), "--child",
                              str(budget), trace], check=True, capture_output=True, text=True)
        print(summarize(budget, json.loads(out.stdout.strip().splitlines()[-1]), trace),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
