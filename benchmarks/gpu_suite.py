"""GPU benchmark suite (BENCHMARKS.md): ceilings, L1, T1, T2, M1, C1, K1 with peers in one run.

    python benchmarks/gpu_suite.py [--quick] [--shape llama3-8b|llama3.2-1b|qwen3-0.6b|...]
                                   [--hf-compile] [--trace] [--no-mixed-graphs]
                                   [--skip L1,L1hf,T1,T1hf,T2,T2hf,C1,K1]

Random weights of real shapes (``load_format="dummy"``), token-id prompts and
``ignore_eos``, so every engine produces the same token counts. Each workload
runs in its own try block: one failure is reported in the table, the rest run.
Prints one markdown table at the end (paste it into benchmarks/RESULTS.md).

Workloads: L1 (kvflow, HF eager ``generate``, and with ``--hf-compile`` HF with a
static cache, whose ``generate`` compiles the decode step with torch.compile: about
a minute of compiling, so opt-in); T1 (kvflow, HF ``generate_batch``); T2 (1024
requests, prompt and output lengths uniform in [100, 1024]; ``--quick`` runs its
first 256; peer: HF ``generate_batch`` on its first 128 requests, per token, not in
``--quick``, where T1's HF figure is the peer); M1 (KV blocks of T1's engine).
``--trace`` adds the torch.profiler summary of benchmarks/profile_trace.py (L1 decode
steps, a T1 run): GPU time in GEMMs, attention, other kernels, copies, host gaps.
C1 (benchmarks/cold_start.py: fresh processes, kvflow and HF ``from_pretrained``; not in
``--quick``, its 16 GB checkpoint takes a minute to write) and K1
(benchmarks/kernels/bench_attention.py, against SDPA flash) run their own scripts in a
child process and print their tables inline.
``--quick`` on the Llama-3-8B shape stays under 8 minutes on one H100 without
``--hf-compile``/``--trace`` (each adds about a minute).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

SHAPES = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
                      bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
                        bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True),
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645,
                       tie_word_embeddings=True),
    # mosaicml's original remote-code layout (ALiBi, no biases), as the seed's mpt-7b ships.
    "mpt-7b": dict(architectures=["MPTForCausalLM"], model_type="mpt", d_model=4096, n_heads=32,
                   n_layers=32, expansion_ratio=4, max_seq_len=2048, vocab_size=50432,
                   no_bias=True, norm_type="low_precision_layernorm", torch_dtype="bfloat16",
                   attn_config={"alibi": True, "alibi_bias_max": 8, "attn_type":
                                "multihead_attention", "clip_qkv": None, "qk_ln": False},
                   tie_word_embeddings=True),
    # Not a real model: a Llama-layout shape small enough for CPU dry runs of every script.
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
                 intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}

ROWS: list[tuple[str, str, str, str]] = []
TOKEN_ID_MAX = 100000  # prompt ids are drawn below this; main() caps it by the vocabulary


def row(workload: str, engine: str, metric: str, value: str) -> None:
    ROWS.append((workload, engine, metric, value))
    print(f"| {workload} | {engine} | {metric} | {value} |", flush=True)


def median_of(fn, runs: int = 3) -> tuple[float, float, float]:
    vals = [fn() for _ in range(runs)]
    return statistics.median(vals), min(vals), max(vals)


def ceilings() -> tuple[float, float]:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * 8192 ** 3 * 10 / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    row("ceiling", "torch", "copy TB/s", f"{bw / 1e12:.2f}")
    row("ceiling", "torch", "bf16 matmul TFLOP/s", f"{flops / 1e12:.0f}")
    return bw, flops


def weight_bytes(llm) -> int:
    """Bytes of weights one decode step reads (every parameter once; tied ones once)."""
    model = llm.llm_engine.executor.worker.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kvflow_llm(model_dir: str, **kw):
    from kvflow import LLM

    return LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
               seed=0, **kw)


def l1(model_dir: str, cfg: dict, bw: float, quick: bool) -> None:
    from kvflow import SamplingParams

    llm = kvflow_llm(model_dir, max_model_len=2048, max_num_seqs=8)
    rng = random.Random(0)
    prompt = [rng.randrange(1000, TOKEN_ID_MAX) for _ in range(512)]
    p1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    p128 = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, detokenize=False)
    engine = llm.llm_engine
    engine.scheduler.kv_cache_manager.enable_caching = False  # measure real prefill each run
    llm.generate({"prompt_token_ids": prompt}, p128, use_tqdm=False)

    def ttft() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": prompt}, p1, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def total() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": prompt}, p128, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    tt, tt_min, tt_max = median_of(ttft)
    tot, tot_min, tot_max = median_of(total)
    tpot = (tot - tt) / 127
    limit = bw / weight_bytes(llm)
    row("L1", "kvflow", "TTFT ms", f"{tt * 1e3:.1f} (min {tt_min * 1e3:.1f}, max {tt_max * 1e3:.1f})")
    row("L1", "kvflow", "TPOT ms", f"{tpot * 1e3:.2f}")
    row("L1", "kvflow", "out tok/s", f"{1 / tpot:.1f} ({100 / tpot / limit:.0f}% of the "
        f"{limit:.0f} tok/s bandwidth limit)")
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()


def hf_model(model_dir: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def l1_hf(model_dir: str) -> None:
    model = hf_model(model_dir)
    rng = random.Random(0)
    x = torch.tensor([[rng.randrange(1000, TOKEN_ID_MAX) for _ in range(512)]], device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(8)
    tt = statistics.median(run(1) for _ in range(3))
    tot = statistics.median(run(128) for _ in range(2))
    row("L1", "HF eager generate", "TTFT ms", f"{tt * 1e3:.1f}")
    row("L1", "HF eager generate", "out tok/s", f"{127 / (tot - tt):.1f}")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def l1_hf_static_compile(model_dir: str) -> None:
    """HF ``generate`` with ``cache_implementation="static"``: transformers compiles the
    decode step (torch.compile) itself. TTFT and TPOT come from one 128-token run: a
    streamer clocks the first generated token, so the static cache keeps one shape and
    compiles once (warm-ups run the same call)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        """Records when generate hands over its first new token (the prompt comes first)."""

        def __init__(self) -> None:
            self.calls = 0
            self.first_token_at = 0.0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:
                torch.cuda.synchronize()
                self.first_token_at = time.perf_counter()

        def end(self) -> None:
            pass

    model = hf_model(model_dir)
    rng = random.Random(0)
    x = torch.tensor([[rng.randrange(1000, TOKEN_ID_MAX) for _ in range(512)]],
                     device=model.device)

    def run() -> tuple[float, float]:
        clock = FirstTokenClock()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=128,
                           min_new_tokens=128, do_sample=False, cache_implementation="static",
                           streamer=clock)
        torch.cuda.synchronize()
        end = time.perf_counter()
        return clock.first_token_at - t, end - t

    try:
        t = time.perf_counter()
        run()
        compile_s = time.perf_counter() - t
        run()
        runs = [run() for _ in range(3)]
        tt = statistics.median(r[0] for r in runs)
        tot = statistics.median(r[1] for r in runs)
        engine = "HF static cache + torch.compile"
        row("L1", engine, "TTFT ms", f"{tt * 1e3:.1f}")
        row("L1", engine, "out tok/s", f"{127 / (tot - tt):.1f} (first call incl. compile "
            f"{compile_s:.0f} s)")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def t1_requests(n: int = 128, out_len: int = 256) -> list[list[int]]:
    random.seed(0)
    lens = [random.randint(100, 1024) for _ in range(n)]
    rng = random.Random(1)
    return [[rng.randrange(1000, TOKEN_ID_MAX) for _ in range(L)] for L in lens]


def t1(model_dir: str, quick: bool) -> float:
    from kvflow import SamplingParams

    reqs = t1_requests()
    llm = kvflow_llm(model_dir, max_model_len=2048, max_num_seqs=256)
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": r} for r in reqs[:8]],
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)

    def run() -> float:
        llm.llm_engine.scheduler.kv_cache_manager.pool.reset_prefix_cache()
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": r} for r in reqs], params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    med, lo, hi = median_of(run, 1 if quick else 3)
    out_tps = 128 * 256 / med
    total_tps = (sum(map(len, reqs)) + 128 * 256) / med
    row("T1", "kvflow", "out tok/s", f"{out_tps:.0f} (min {128 * 256 / hi:.0f}, max {128 * 256 / lo:.0f})")
    row("T1", "kvflow", "total tok/s", f"{total_tps:.0f}")
    row("M1", "kvflow", "KV blocks / tokens",
        f"{llm.llm_engine.num_blocks} / {llm.llm_engine.num_blocks * 16}")
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out_tps


def t1_hf(model_dir: str) -> None:
    from transformers import GenerationConfig

    model = hf_model(model_dir)
    reqs = t1_requests()
    gen_cfg = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=-1,
                               pad_token_id=0, use_cuda_graph=False)
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate_batch(inputs=reqs, generation_config=gen_cfg, progress_bar=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        row("T1", "HF generate_batch", "out tok/s", f"{128 * 256 / dt:.0f}")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def t2_requests(n: int = 1024) -> tuple[list[list[int]], list[int]]:
    """T2's requests: prompt and output lengths uniform in [100, 1024] (``random.seed(0)``)."""
    random.seed(0)
    lens = [(random.randint(100, 1024), random.randint(100, 1024)) for _ in range(n)]
    rng = random.Random(1)
    prompts = [[rng.randrange(1000, TOKEN_ID_MAX) for _ in range(p)] for p, _ in lens]
    return prompts, [o for _, o in lens]


def t2(model_dir: str, quick: bool) -> None:
    from kvflow import SamplingParams

    prompts, out_lens = t2_requests()
    if quick:
        prompts, out_lens = prompts[:256], out_lens[:256]
    llm = kvflow_llm(model_dir, max_model_len=2048, max_num_seqs=256)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
              for n in out_lens]
    items = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(items[:8], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)

    def run() -> float:
        llm.llm_engine.scheduler.kv_cache_manager.pool.reset_prefix_cache()
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(items, params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    med, lo, hi = median_of(run, 1 if quick else 3)
    out = sum(out_lens)
    row("T2", "kvflow", f"out tok/s ({len(prompts)} requests, {out} tokens)",
        f"{out / med:.0f} (min {out / hi:.0f}, max {out / lo:.0f})")
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def t2_hf(model_dir: str) -> None:
    """HF ``generate_batch`` on T2's first 128 prompts; one max_new_tokens for all (its
    config is per batch): their mean output length, so the figure is per token."""
    from transformers import GenerationConfig

    prompts, out_lens = t2_requests()
    prompts, out_lens = prompts[:128], out_lens[:128]
    new_tokens = round(statistics.fmean(out_lens))
    model = hf_model(model_dir)
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                               pad_token_id=0, use_cuda_graph=False)
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate_batch(inputs=prompts, generation_config=gen_cfg, progress_bar=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        row("T2", "HF generate_batch", f"out tok/s ({len(prompts)} requests x {new_tokens} "
            "tokens)", f"{len(prompts) * new_tokens / dt:.0f}")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def traces(model_dir: str, quick: bool) -> None:
    from profile_trace import print_table, run_traces

    n, tokens = (32, 64) if quick else (128, 256)
    summaries = run_traces(model_dir, "cuda", TOKEN_ID_MAX, l1_steps=32,
                           t1_requests=t1_requests(n), t1_tokens=tokens)
    for s in summaries:
        shares = ", ".join(f"{c} {100 * v / s.wall_ms:.0f}%" for c, v in s.busy_ms.items())
        row("trace", s.region, "wall ms; GPU shares; host gaps",
            f"{s.wall_ms:.2f}; {shares}; gaps {100 * s.gaps_ms / s.wall_ms:.0f}%")
    print_table(summaries)


def run_script(workload: str, argv: list[str]) -> None:
    """Runs a workload that has its own script (C1 needs fresh processes, K1 its own
    table), in a child process so this one's GPU memory does not count; prints its tables."""
    gc.collect()
    torch.cuda.empty_cache()
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
    print(f"\n#### {workload}: python {' '.join(os.path.relpath(a) for a in argv)}\n")
    print("\n".join(line for line in out.stdout.splitlines() if "INFO" not in line), flush=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    row(workload, "kvflow + peer", "table", "printed above, from its own script")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--skip", default="",
                    help="comma list of workloads to skip (L1,L1hf,T1,T1hf,T2,T2hf,C1,K1)")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also L1 with HF's static cache + torch.compile (about a minute)")
    ap.add_argument("--no-mixed-graphs", action="store_true",
                    help="capture decode-only CUDA graphs (mixed steps eager): an A/B of the mixed graphs")
    ap.add_argument("--trace", action="store_true",
                    help="also the torch.profiler summary of an L1 decode step and a T1 run")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.no_mixed_graphs:
        from kvflow.worker import cuda_graphs

        cuda_graphs._MIXED_SIZES = ()
    if args.quick:
        skip.add("T2hf")  # T1's HF figure is the per-token peer in a short lease
        skip.add("C1")  # writing its 16 GB checkpoint alone takes a minute or more
    unknown = skip - {"L1", "L1hf", "T1", "T1hf", "T2", "T2hf", "C1", "K1"}
    if unknown:
        ap.error(f"--skip: unknown workloads {sorted(unknown)}")
    cfg = SHAPES[args.shape]
    global TOKEN_ID_MAX
    TOKEN_ID_MAX = min(TOKEN_ID_MAX, cfg["vocab_size"])
    model_dir = tempfile.mkdtemp(prefix="kvflow-bench-")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    import triton
    import transformers

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
          f"{triton.__version__} | transformers {transformers.__version__} | shape {args.shape}")
    print("| workload | engine | metric | value |\n|---|---|---|---|")
    bw, _ = ceilings()
    steps = [("L1", lambda: l1(model_dir, cfg, bw, args.quick)), ("L1hf", lambda: l1_hf(model_dir))]
    if args.hf_compile:
        steps.append(("L1hfc", lambda: l1_hf_static_compile(model_dir)))
    steps += [("T1", lambda: t1(model_dir, args.quick)), ("T1hf", lambda: t1_hf(model_dir)),
              ("T2", lambda: t2(model_dir, args.quick)), ("T2hf", lambda: t2_hf(model_dir))]
    if args.trace:
        steps.append(("trace", lambda: traces(model_dir, args.quick)))
    here = os.path.dirname(os.path.abspath(__file__))
    steps += [("C1", lambda: run_script("C1", [os.path.join(here, "cold_start.py"),
                                               "--shape", args.shape])),
              ("K1", lambda: run_script("K1", [os.path.join(here, "kernels", "bench_attention.py")]
                                        + (["--quick"] if args.quick else [])))]
    failed = 0
    for name, fn in steps:
        if name in skip:
            continue
        try:
            fn()
        except Exception as exc:  # report, keep going
            failed += 1
            traceback.print_exc()
            row(name, "-", "error", f"{type(exc).__name__}: {str(exc)[:120]}")
            gc.collect()
            torch.cuda.empty_cache()
    print("\n| workload | engine | metric | value |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
