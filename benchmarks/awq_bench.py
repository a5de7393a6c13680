"""Q1 of BENCHMARKS.md: L1 and T1 on an AWQ int4 checkpoint of the Llama-3-8B shape,
next to kvflow bf16 on the same shape, in one run.

    python benchmarks/awq_bench.py [--quick] [--shape llama3-8b|llama2-7b|tiny]
                                   [--group-size 128] [--workdir DIR] [--skip L1,T1]
                                   [--awq-kernels auto,triton,int4pack,gemv]

``--awq-kernels`` runs the AWQ engine once per listed ``KVFLOW_AWQ_KERNEL`` value
(rows "awq-<kernel>"), so one run compares tinygemm with kvflow's Triton kernels.

The bf16 peer draws random weights (``load_format="dummy"``). AWQ has no dummy
path that means anything (random int32 words are random codes, but the scales
and zeros would be too), so the benchmark writes a real checkpoint once: random
bf16-scale weights quantized on the GPU into AutoAWQ's GEMM layout
(``kvflow.quantization.awq_format.quantize``), saved as safetensors shards under
``--workdir`` and reused by later runs with the same shape and group size.

Workloads (token-id prompts, ``ignore_eos``, greedy, prefix caching off):
  L1  batch 1, prompt 512 random ids, 128 new tokens: TTFT (a 1-token run),
      TPOT = (128-token run - TTFT) / 127, out tok/s = 1 / TPOT; median of 3.
  T1  128 requests, prompt lengths uniform in [100, 1024] (random.seed(0)),
      256 new tokens each, one ``generate``; output and total tok/s; median of 3.
Goals: AWQ L1 >= 2.5x bf16 out tok/s; AWQ T1 >= 0.8x bf16 out tok/s. Prints a
markdown table (paste it into benchmarks/RESULTS.md with the command and commit).
``--shape tiny`` runs the whole script on CPU in a minute, to check the script.
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
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import SHAPES as _SUITE_SHAPES  # noqa: E402  (one definition of the shapes)

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": _SUITE_SHAPES["llama3-8b"],
    "llama2-7b": dict(_SUITE_SHAPES["llama3-8b"], intermediate_size=11008, num_key_value_heads=32,
                      vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      torch_dtype="float16", bos_token_id=1, eos_token_id=2),
    "tiny": dict(_SUITE_SHAPES["llama3-8b"], hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000, max_position_embeddings=2048, rope_theta=10000.0,
                 bos_token_id=1, eos_token_id=2),
}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ROWS: list[tuple[str, str, str, str]] = []


def row(workload: str, engine: str, metric: str, value: str) -> None:
    ROWS.append((workload, engine, metric, value))
    print(f"| {workload} | {engine} | {metric} | {value} |", flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_of(fn: Callable[[], float], runs: int = 3) -> tuple[float, float, float]:
    values = [fn() for _ in range(runs)]
    return statistics.median(values), min(values), max(values)


# ------------------------------------------------------------------ checkpoints

def linear_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Checkpoint linear name -> (N, K) of one decoder layer."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
            "o_proj": (hidden, q), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def write_awq_checkpoint(path: str, cfg: dict[str, Any], group_size: Optional[int]) -> str:
    """Random weights quantized into AutoAWQ's GEMM layout, one shard per few layers.

    Reuses ``path`` when a previous run finished writing it with the same settings.
    """
    from safetensors.torch import save_file

    from kvflow.quantization import awq_format

    settings = {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm",
                "group_size": -1 if group_size is None else group_size}
    full_cfg = {**cfg, "quantization_config": settings}
    done = os.path.join(path, "kvflow_bench_done.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            if json.load(f) == full_cfg:
                print(f"reusing AWQ checkpoint {path}", flush=True)
                return path
    os.makedirs(path, exist_ok=True)
    start = time.perf_counter()
    dev = device()
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.float16 if cfg["torch_dtype"] == "float16" else torch.bfloat16
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush(index: int) -> None:
        name = f"model-{index:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard.clear()

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, generator=gen) * 0.02

    shard["model.embed_tokens.weight"] = rand(vocab, hidden).to(dtype).cpu()
    shard["lm_head.weight"] = rand(vocab, hidden).to(dtype).cpu()
    shard["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    num_shards = 0
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for name, (num_out, num_in) in linear_shapes(cfg).items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            qweight, qzeros, scales = awq_format.quantize(rand(num_out, num_in), group_size)
            shard[f"{prefix}.{part}.{name}.qweight"] = qweight.cpu()
            shard[f"{prefix}.{part}.{name}.qzeros"] = qzeros.cpu()
            shard[f"{prefix}.{part}.{name}.scales"] = scales.cpu()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shard[f"{prefix}.{norm}.weight"] = torch.ones(hidden, dtype=dtype)
        if layer % 4 == 3:
            flush(num_shards)
            num_shards += 1
    if shard:
        flush(num_shards)
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(full_cfg, f, indent=2)
    with open(done, "w", encoding="utf-8") as f:
        json.dump(full_cfg, f)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in set(weight_map.values()))
    print(f"wrote AWQ checkpoint {path}: {size / 1e9:.2f} GB in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return path


def write_dummy_config(path: str, cfg: dict[str, Any]) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return path


# ------------------------------------------------------------------ workloads

def make_llm(engine: str, model_dir: str, dtype: str, **kw: Any):
    from kvflow import LLM

    extra = {"load_format": "dummy"} if engine == "bf16" else {}
    if engine.startswith("awq-"):  # read when the engine builds its AWQ linear method
        os.environ["KVFLOW_AWQ_KERNEL"] = engine[len("awq-"):]
    return LLM(model_dir, skip_tokenizer_init=True, dtype=dtype, seed=0,
               enable_prefix_caching=False, **extra, **kw)


def l1(engine: str, model_dir: str, dtype: str, vocab: int) -> float:
    """Returns out tok/s."""
    from kvflow import SamplingParams

    llm = make_llm(engine, model_dir, dtype, max_model_len=2048, max_num_seqs=8)
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(512)]}
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    full = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, detokenize=False)
    llm.generate(prompt, full, use_tqdm=False)  # warm up (compiles, captures)

    def timed(params) -> Callable[[], float]:
        def run() -> float:
            sync()
            start = time.perf_counter()
            llm.generate(prompt, params, use_tqdm=False)
            sync()
            return time.perf_counter() - start
        return run

    ttft, ttft_lo, ttft_hi = median_of(timed(one))
    total, total_lo, total_hi = median_of(timed(full))
    tpot = (total - ttft) / 127
    row("L1", engine, "TTFT ms", f"{ttft * 1e3:.1f} (min {ttft_lo * 1e3:.1f}, "
        f"max {ttft_hi * 1e3:.1f})")
    row("L1", engine, "TPOT ms", f"{tpot * 1e3:.2f} (128-token run: min {total_lo:.3f} s, "
        f"max {total_hi:.3f} s)")
    row("L1", engine, "out tok/s", f"{1 / tpot:.1f}")
    llm = None  # drop the engine (and its KV cache) before the next one is built
    release()
    return 1 / tpot


def t1_requests(vocab: int, num_requests: int) -> list[list[int]]:
    random.seed(0)
    lens = [random.randint(100, 1024) for _ in range(num_requests)]
    rng = random.Random(1)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lens]


def t1(engine: str, model_dir: str, dtype: str, vocab: int, quick: bool) -> float:
    """Returns output tok/s."""
    from kvflow import SamplingParams

    num_requests, out_len = (32, 64) if quick else (128, 256)
    reqs = [{"prompt_token_ids": r} for r in t1_requests(vocab, num_requests)]
    llm = make_llm(engine, model_dir, dtype, max_model_len=2048, max_num_seqs=256)
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True, detokenize=False)
    llm.generate(reqs[:8], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False),
                 use_tqdm=False)

    def run() -> float:
        sync()
        start = time.perf_counter()
        llm.generate(reqs, params, use_tqdm=False)
        sync()
        return time.perf_counter() - start

    med, lo, hi = median_of(run, 1 if quick else 3)
    out_tokens = num_requests * out_len
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in reqs)
    row("T1", engine, "out tok/s", f"{out_tokens / med:.0f} (min {out_tokens / hi:.0f}, "
        f"max {out_tokens / lo:.0f}; {num_requests} requests x {out_len})")
    row("T1", engine, "total tok/s", f"{(prompt_tokens + out_tokens) / med:.0f}")
    llm = None  # drop the engine (and its KV cache) before the next one is built
    release()
    return out_tokens / med


def ceilings() -> None:
    if not torch.cuda.is_available():
        return
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    bandwidth = 2 * x.numel() * 10 / (time.perf_counter() - start)
    row("ceiling", "torch", "copy TB/s", f"{bandwidth / 1e12:.2f}")
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    row("ceiling", "torch", "bf16 matmul TFLOP/s",
        f"{2 * 8192 ** 3 * 10 / (time.perf_counter() - start) / 1e12:.0f}")
    del a, b
    release()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T1 with 32 requests x 64 tokens, 1 run")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, -1])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kvflow-awq-bench"))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="activation dtype of both engines")
    ap.add_argument("--skip", default="", help="comma list of workloads to skip (L1,T1)")
    ap.add_argument("--awq-kernels", default="auto",
                    help="comma list of KVFLOW_AWQ_KERNEL values to run the AWQ engine with "
                         "(auto, triton, int4pack, gemv)")
    args = ap.parse_args()
    from kvflow.envs import AWQ_KERNELS

    kernels = [k.strip() for k in args.awq_kernels.split(",") if k.strip()]
    if not kernels or any(k not in AWQ_KERNELS for k in kernels):
        ap.error(f"--awq-kernels {args.awq_kernels!r}: pick from {AWQ_KERNELS}")
    awq_engines = [f"awq-{k}" for k in kernels]
    skip = set(filter(None, args.skip.split(",")))
    cfg = SHAPES[args.shape]
    group = None if args.group_size == -1 else args.group_size
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | shape "
          f"{args.shape} | AWQ group {args.group_size} | dtype {args.dtype}", flush=True)
    awq_dir = write_awq_checkpoint(
        os.path.join(args.workdir, f"{args.shape}-awq-g{args.group_size}"), cfg, group)
    bf16_dir = write_dummy_config(os.path.join(args.workdir, f"{args.shape}-dummy"), cfg)
    print("| workload | engine | metric | value |\n|---|---|---|---|", flush=True)
    ceilings()
    results: dict[tuple[str, str], float] = {}
    failed = 0
    for workload in ("L1", "T1"):
        if workload in skip:
            continue
        for engine, model_dir in [("bf16", bf16_dir)] + [(e, awq_dir) for e in awq_engines]:
            try:
                if workload == "L1":
                    results[workload, engine] = l1(engine, model_dir, args.dtype,
                                                   cfg["vocab_size"])
                else:
                    results[workload, engine] = t1(engine, model_dir, args.dtype,
                                                   cfg["vocab_size"], args.quick)
            except Exception as exc:  # report it, run the rest
                failed += 1
                traceback.print_exc()
                row(workload, engine, "error", f"{type(exc).__name__}: {str(exc)[:160]}")
                release()
        for engine in awq_engines:
            if (workload, "bf16") in results and (workload, engine) in results:
                ratio = results[workload, engine] / results[workload, "bf16"]
                goal = 2.5 if workload == "L1" else 0.8
                row(workload, f"{engine} / bf16", "out tok/s ratio",
                    f"{ratio:.2f}x (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")
    print("\n| workload | engine | metric | value |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
