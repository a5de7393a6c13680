#!/usr/bin/env bash
# Third device batch: bf16 agreement with transformers, then S1 serving against offline.
source "$(dirname "$0")/device_env.sh"
echo "=== bf16 agreement"
timeout 150 python3 benchmarks/bf16_agreement.py 2>&1 | grep -v Warning | tee "$OUT/bf16.txt" | tail -5
echo "=== S1 serving"
write_8b_config
timeout 400 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048" \
  --offline-ceiling --request-rates 16 inf 4 --num-prompts ${S1_PROMPTS:-500} --input-len 512 --output-len 128 \
  --result-json "$OUT/s1.json" 2>&1 | grep -v "INFO.*POST\|INFO.*finished" | tee "$OUT/s1.txt" | tail -30
