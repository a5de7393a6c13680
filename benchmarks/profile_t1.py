"""Host-side profile of the T1 workload (cProfile): where a step's CPU time goes.

    python benchmarks/profile_t1.py [--shape llama3-8b] [--requests 128]

Time inside ``tolist``/``item`` is the host waiting for the GPU; everything
else at the top of the list is host overhead that the GPU waits for.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from gpu_suite import SHAPES, t1_requests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--requests", type=int, default=128)
    args = ap.parse_args()
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(SHAPES[args.shape], f)
    from kvflow import LLM, SamplingParams

    llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048)
    reqs = t1_requests(args.requests)
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": r} for r in reqs[:4]], params, use_tqdm=False)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    llm.generate([{"prompt_token_ids": r} for r in reqs], params, use_tqdm=False)
    prof.disable()
    dt = time.perf_counter() - t
    print(f"T1 {args.requests} requests: {dt:.2f} s, {args.requests * 256 / dt:.0f} out tok/s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
