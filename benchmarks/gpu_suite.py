"""GPU benchmark suite (BENCHMARKS.md): ceilings, L1, T1, M1 with their peers in one run.

    python benchmarks/gpu_suite.py [--quick] [--shape llama3-8b|llama3.2-1b|qwen3-0.6b]

Random weights of real shapes (``load_format="dummy"``), token-id prompts and
``ignore_eos``, so every engine produces the same token counts. Each workload
runs in its own try block: one failure is reported in the table, the rest run.
Prints one markdown table at the end (paste it into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--skip", default="", help="comma list of workloads to skip (L1,L1hf,T1,T1hf)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
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
    steps = [("L1", lambda: l1(model_dir, cfg, bw, args.quick)), ("L1hf", lambda: l1_hf(model_dir)),
             ("T1", lambda: t1(model_dir, args.quick)), ("T1hf", lambda: t1_hf(model_dir))]
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
