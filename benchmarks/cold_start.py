"""C1 (BENCHMARKS.md): a new process to its first token, from a safetensors checkpoint on disk.

    python benchmarks/cold_start.py [--shape llama3-8b] [--dir /tmp/kvflow-c1]

Writes the checkpoint once (random bf16 weights of the shape, 5 GB shards), then
times in a fresh Python process: import, model load, memory profile, KV cache +
CUDA graph capture, first token. Compared with transformers' ``from_pretrained``
plus one-token ``generate`` in another fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KVFLOW_CHILD = r"""
import time, json, sys
t0 = time.perf_counter()
from kvflow import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096)
t2 = time.perf_counter()
llm.generate({"prompt_token_ids": [1000 + i for i in range(512)]},
             SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, **llm.llm_engine.startup_seconds,
                  "first_token": t3 - t2, "to_first_token": time.time() - float(sys.argv[2])}))
"""

HF_CHILD = r"""
import time, json, sys
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
t2 = time.perf_counter()
x = torch.tensor([[1000 + i for i in range(512)]], device="cuda")
model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False)
torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_token": t3 - t2,
                  "to_first_token": time.time() - float(sys.argv[2])}))
"""


def write_checkpoint(shape: str, path: str) -> None:
    import torch
    from safetensors.torch import save_file

    from gpu_suite import SHAPES

    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return
    os.makedirs(path, exist_ok=True)
    cfg = SHAPES[shape]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    shard, size, index, n = {}, 0, {}, 0
    gen = torch.Generator(device="cuda").manual_seed(0)

    def flush() -> None:
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, p in meta.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.bfloat16, device="cuda").uniform_(-0.02, 0.02,
                                                                              generator=gen)
        shard[name] = t.cpu()
        size += t.numel() * 2
        if size >= 5 << 30:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)


def run_child(code: str, path: str) -> dict:
    start = time.perf_counter()
    # The child reports its first token against this wall-clock instant, taken just before
    # the spawn, so the interpreter's own start counts too.
    out = subprocess.run([sys.executable, "-c", code, path, repr(time.time())],
                         capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dir", default="/tmp/kvflow-c1")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    t = time.perf_counter()
    write_checkpoint(args.shape, args.dir)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s", flush=True)
    print("| engine | import s | load s | profile s | cache+graphs s | first token s | "
          "new process to first token s | process wall s (incl. exit) |")
    print("|---|---|---|---|---|---|---|---|")
    r = run_child(KVFLOW_CHILD, args.dir)
    print(f"| kvflow | {r['import']:.2f} | {r['load']:.2f} | {r['profile']:.2f} | "
          f"{r['cache_and_graphs']:.2f} | {r['first_token']:.2f} | {r['to_first_token']:.2f} | "
          f"{r['wall']:.2f} |", flush=True)
    if not args.skip_hf:
        r = run_child(HF_CHILD, args.dir)
        print(f"| HF from_pretrained + generate | {r['import']:.2f} | {r['load']:.2f} | - | - | "
              f"{r['first_token']:.2f} | {r['to_first_token']:.2f} | {r['wall']:.2f} |")


if __name__ == "__main__":
    main()
