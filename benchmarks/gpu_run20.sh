#!/usr/bin/env bash
# Twentieth device batch (fourth session): the warm-ups on the GPU (no Triton compile after
# start-up), S1 at inf rate without a cap (eager steps now warmed, run-time ints no longer
# specialised) with the step trace, and C1 with a Llama-3-sized tokenizer and every
# start-up warm-up included.
source "$(dirname "$0")/device_env.sh"
echo "=== pytest warm-up on the GPU"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/engine/test_warm_up.py tests/engine/test_cuda_graphs_gpu.py 2>&1 | tail -3
write_8b_config
echo "=== S1 inf rate, cap 0, offline ceiling (warmed)" | tee -a "$OUT/log.txt"
KVFLOW_STEP_TRACE=$OUT/steps_inf.jsonl timeout 200 python3 benchmarks/serving.py \
  --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048" \
  --offline-ceiling --request-rates inf --num-prompts 500 --input-len 512 --output-len 128 --seed 100 \
  --per-request-out "$OUT/req_inf" 2>&1 | grep -v "INFO:\|uvicorn\|finished (length)" | tail -4 | tee -a "$OUT/log.txt"
echo "=== C1 cold start (Llama-3-8B shape, 16 GB safetensors + tokenizer)" | tee -a "$OUT/log.txt"
timeout 230 python3 benchmarks/cold_start.py --runs 2 --skip-hf 2>&1 | tail -40 | tee -a "$OUT/log.txt"
