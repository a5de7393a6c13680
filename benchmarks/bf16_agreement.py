"""Issue 3, point 5: kvflow and transformers agree in bf16 on a Llama-3-8B-shaped model.

    python benchmarks/bf16_agreement.py [--shape llama3-8b] [--prompts 64]

One set of random weights (transformers' own init, on the GPU) is loaded into
both engines. For 64 random prompts, compare the next-token top-1 and the
log-probabilities of kvflow's top-5 tokens with transformers' log_softmax.
Exits non-zero when top-1 agreement is under 99%.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_suite import SHAPES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args()
    cfg = dict(SHAPES[args.shape])
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvflow import LLM, SamplingParams

    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                              dtype=torch.bfloat16).eval()
    llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              gpu_memory_utilization=0.5, max_model_len=1024, max_logprobs=5)
    model = llm.llm_engine.executor.worker.model
    loaded = model.load_weights((n, t) for n, t in hf.state_dict().items())
    assert loaded, "no weight was copied into kvflow"
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, cfg["vocab_size"] - 1) for _ in range(rng.randint(16, 256))]
               for _ in range(args.prompts)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True),
                        use_tqdm=False)
    agree, max_diff = 0, 0.0
    with torch.no_grad():
        for p, out in zip(prompts, outs):
            logits = hf(torch.tensor([p], device="cuda")).logits[0, -1].float()
            ref = torch.log_softmax(logits, dim=-1)
            tok = out.outputs[0].token_ids[0]
            agree += int(tok == int(logits.argmax()))
            for tid, lp in out.outputs[0].logprobs[0].items():
                max_diff = max(max_diff, abs(lp.logprob - ref[tid].item()))
    rate = agree / len(prompts)
    print(f"| bf16 agreement | {args.shape} | top-1 {agree}/{len(prompts)} ({rate:.1%}) | "
          f"max |logprob diff| over kvflow's top-5: {max_diff:.4f} |")
    return 0 if rate >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
