#!/usr/bin/env bash
# Eighteenth device batch (fourth session): S1 after freezing the start-up heap (engine core
# and API processes) and warming the eager tail (LM head + sampler per row count, a replay
# of every graph) -- BENCHMARKS.md's protocol with the 64-token cap, and the default server.
source "$(dirname "$0")/device_env.sh"
echo "=== pytest warm-up (no Triton compile after start-up) + CUDA graphs on the GPU"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/test_warm_up.py tests/engine/test_cuda_graphs_gpu.py 2>&1 | tail -3
write_8b_config
echo "=== S1 cap 64: rates 16, 4, inf + offline ceiling" | tee -a "$OUT/log.txt"
KVFLOW_STEP_TRACE=$OUT/steps_cap64.jsonl timeout 270 python3 benchmarks/serving.py \
  --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold 64" \
  --offline-ceiling --request-rates 16 4 inf --num-prompts 500 --input-len 512 --output-len 128 \
  --per-request-out "$OUT/req_cap64" 2>&1 | grep -v "INFO:\|uvicorn\|finished (length)" | tail -6 | tee -a "$OUT/log.txt"
echo "=== S1 default (no cap): rate 16" | tee -a "$OUT/log.txt"
KVFLOW_STEP_TRACE=$OUT/steps_cap0.jsonl timeout 110 python3 benchmarks/serving.py \
  --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048" \
  --request-rates 16 --num-prompts 500 --input-len 512 --output-len 128 \
  --per-request-out "$OUT/req_cap0" 2>&1 | grep -v "INFO:\|uvicorn\|finished (length)" | tail -3 | tee -a "$OUT/log.txt"
