#!/usr/bin/env bash
# Seventeenth device batch (fourth session): where S1's p99 TPOT goes.
# 1. GPU time per step shape with linears on cuBLAS past 8 tokens (default) vs the Triton
#    GEMV up to 64 tokens; 2. S1 at 16 req/s (cap 64) with the engine's step trace and the
#    client's per-request times, default vs GEMV-64.
source "$(dirname "$0")/device_env.sh"
write_8b_config
for g in 8 64; do
  echo "=== step_times, KVFLOW_MAX_GEMV_TOKENS=$g"
  KVFLOW_MAX_GEMV_TOKENS=$g timeout 200 python3 benchmarks/step_times.py --decodes 1,8,16,24,32,48,64 \
    --chunks 0,64,128 2>&1 | grep "^|" | tee -a "$OUT/log.txt"
done
for g in 8 64; do
  echo "=== S1 16 req/s cap 64, KVFLOW_MAX_GEMV_TOKENS=$g" | tee -a "$OUT/log.txt"
  KVFLOW_STEP_TRACE=$OUT/steps_g$g.jsonl KVFLOW_MAX_GEMV_TOKENS=$g timeout 150 python3 benchmarks/serving.py \
    --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold 64" \
    --request-rates 16 --num-prompts 500 --input-len 512 --output-len 128 \
    --per-request-out "$OUT/req_g$g" 2>&1 | grep -v "INFO:\|uvicorn\|finished (length)" | tail -3 | tee -a "$OUT/log.txt"
done
