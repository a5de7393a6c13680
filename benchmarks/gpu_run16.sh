#!/usr/bin/env bash
# Sixteenth device batch (third session): S1 at inf rate on prompts no earlier run cached
# (run 15's inf rows followed the 16 req/s run on the same prompts: prefix-cache hits).
source "$(dirname "$0")/device_env.sh"
write_8b_config
for cap in 64 0; do
  echo "=== S1 inf rate, cap $cap, offline ceiling"
  timeout 140 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold $cap" \
    --offline-ceiling --request-rates inf --num-prompts 500 --input-len 512 --output-len 128 2>&1 \
    | grep -v "INFO:\|uvicorn\|finished (length)" | tee "$OUT/s1_inf_cap$cap.txt" | tail -4
done
