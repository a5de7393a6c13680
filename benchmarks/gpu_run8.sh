#!/usr/bin/env bash
# Eighth device batch (closing figures): suite L1/T1 with peers, AWQ Q1, S1 serving.
source "$(dirname "$0")/device_env.sh"
echo "=== suite --quick: ceilings, L1 + HF eager, T1 + HF generate_batch, M1"
timeout 280 python3 benchmarks/gpu_suite.py --quick --skip T2,T2hf 2>&1 | grep -v INFO | tee "$OUT/suite.txt"
echo "=== Q1 AWQ (quick)"
timeout 130 python3 benchmarks/awq_bench.py --quick 2>&1 | grep -v INFO | tee "$OUT/awq.txt" | tail -12
echo "=== S1 serving vs offline"
write_8b_config
timeout 200 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048" \
  --offline-ceiling --request-rates inf 16 --num-prompts 500 --input-len 512 --output-len 128 2>&1 | grep -v INFO | tee "$OUT/s1.txt" | tail -25
