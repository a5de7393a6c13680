#!/usr/bin/env bash
# Twenty-first device batch (fourth session): C1 with the tokenizer loading in a thread
# beside the model (run 20: 12.6 s, 3.7 s of it the tokenizer first), then L1 and T1
# (kvflow only: no regression from the start-up warm-ups).
source "$(dirname "$0")/device_env.sh"
echo "=== C1 cold start (Llama-3-8B shape, 16 GB safetensors + Llama-3-sized tokenizer)" | tee -a "$OUT/log.txt"
timeout 200 python3 benchmarks/cold_start.py --runs 2 --skip-hf 2>&1 | tail -32 | tee -a "$OUT/log.txt"
echo "=== L1 + T1 (kvflow)" | tee -a "$OUT/log.txt"
timeout 300 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tee -a "$OUT/log.txt"
