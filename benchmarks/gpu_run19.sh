#!/usr/bin/env bash
# Nineteenth device batch (fourth session): S1 at inf rate against an offline ceiling that
# now warms up on the whole workload first (run 18's ceiling paid Triton JIT in its timed
# pass), default server and 64-token cap; and S1 16 req/s with the cap on other prompts.
source "$(dirname "$0")/device_env.sh"
write_8b_config
SERVE="/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
for cap in 0 64; do
  echo "=== S1 inf rate, cap $cap, offline ceiling (warmed)" | tee -a "$OUT/log.txt"
  timeout 200 python3 benchmarks/serving.py --serve-args "$SERVE --long-prefill-token-threshold $cap" \
    --offline-ceiling --request-rates inf --num-prompts 500 --input-len 512 --output-len 128 --seed 100 \
    2>&1 | grep -v "INFO:\|uvicorn\|finished (length)" | tail -4 | tee -a "$OUT/log.txt"
done
echo "=== S1 16 req/s cap 64, prompts of seed 7" | tee -a "$OUT/log.txt"
KVFLOW_STEP_TRACE=$OUT/steps_s7.jsonl timeout 110 python3 benchmarks/serving.py --serve-args "$SERVE --long-prefill-token-threshold 64" \
  --request-rates 16 --num-prompts 500 --input-len 512 --output-len 128 --seed 7 --per-request-out "$OUT/req_s7" \
  2>&1 | grep -v "INFO:\|uvicorn\|finished (length)" | tail -3 | tee -a "$OUT/log.txt"
