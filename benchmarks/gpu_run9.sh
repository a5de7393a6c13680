#!/usr/bin/env bash
# Ninth device batch: HF static-cache+compile peer, T2, trace after the split-KV change,
# S1 with long_prefill_token_threshold 128.
source "$(dirname "$0")/device_env.sh"
echo "=== S1 serving vs offline, --long-prefill-token-threshold 128"
write_8b_config
timeout 200 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold 128" \
  --offline-ceiling --request-rates 16 inf --num-prompts 500 --input-len 512 --output-len 128 2>&1 | grep -v INFO | tee "$OUT/s1.txt" | tail -6
echo "=== suite --quick --hf-compile --trace (L1, HF static+compile, T1, T2 on 256, trace)"
timeout 380 python3 benchmarks/gpu_suite.py --quick --hf-compile --trace --skip L1hf,T1hf,T2hf 2>&1 | grep -v INFO | tee "$OUT/suite.txt" | tail -40
