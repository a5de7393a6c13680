#!/usr/bin/env bash
# Twelfth device batch (third session): mixed-graph attention variants (split-KV factor,
# query tile) by step shape; S1 at 16 req/s with a 32-token prefill cap.
source "$(dirname "$0")/device_env.sh"
echo "=== step times by mixed-graph variant"
timeout 200 python3 benchmarks/step_times.py --decodes 1,18,48 --chunks 0,32,64,128 \
  --mixed-variants 1:0,2:0,4:0,4:16,8:16,1:16 2>&1 | grep -v INFO | tee "$OUT/steps.txt"
write_8b_config
echo "=== S1 at 16 req/s, long_prefill_token_threshold=32"
timeout 100 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold 32" \
  --request-rates 16 --num-prompts 400 --input-len 512 --output-len 128 2>&1 \
  | grep -v "INFO:\|uvicorn\|finished (length)" | tee "$OUT/s1_cap32.txt" | tail -4
