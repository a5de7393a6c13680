"""X1 (BENCHMARKS.md): CPU throughput, kvflow against transformers' batched generate.

    python benchmarks/cpu_throughput.py [--shape tiny|0.5b] [--prompts 32] [--out 32]

Random weights of the given shape, float32, token-id prompts of lengths uniform
in [16, 128] (seed 0), ``ignore_eos``. transformers runs the same prompts as
one left-padded batch. Prints a markdown table row per engine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--out", type=int, default=32)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=2048, tie_word_embeddings=True)
    path = tempfile.mkdtemp(prefix="kvflow-x1-")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(path)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, cfg.vocab_size) for _ in range(rng.randint(16, 128))]
               for _ in range(args.prompts)]
    n_out = args.prompts * args.out

    from kvflow import LLM, SamplingParams

    llm = LLM(path, skip_tokenizer_init=True, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=args.out, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
    llm.llm_engine.scheduler.kv_cache_manager.pool.reset_prefix_cache()
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    kv = time.perf_counter() - t

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=args.out, min_new_tokens=args.out,
                    do_sample=False, pad_token_id=0)
    hft = time.perf_counter() - t
    print(f"X1 shape={args.shape} prompts={args.prompts} out={args.out} threads={torch.get_num_threads()}")
    print("| engine | seconds | output tok/s |\n|---|---|---|")
    print(f"| kvflow | {kv:.2f} | {n_out / kv:.1f} |")
    print(f"| HF generate (padded batch) | {hft:.2f} | {n_out / hft:.1f} |")
    print(json.dumps({"kvflow_tok_s": n_out / kv, "hf_tok_s": n_out / hft}))


if __name__ == "__main__":
    main()
