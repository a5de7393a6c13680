#!/usr/bin/env bash
# Eleventh device batch (third session): step cost by shape (graph vs eager), T1 with and
# without mixed graphs (3 runs each), S1 at 16 req/s with prefill caps 128 / 64.
source "$(dirname "$0")/device_env.sh"
echo "=== step times (8B shape, decodes at context 600 + one chunk)"
timeout 150 python3 benchmarks/step_times.py 2>&1 | grep -v INFO | tee "$OUT/steps.txt"
echo "=== T1 x3, mixed graphs on"
timeout 120 python3 benchmarks/gpu_suite.py --skip L1,L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep -v INFO | grep "T1\|M1" | tee "$OUT/t1_mixed.txt"
echo "=== T1 x3, --no-mixed-graphs"
timeout 120 python3 benchmarks/gpu_suite.py --no-mixed-graphs --skip L1,L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep -v INFO | grep "T1\|M1" | tee "$OUT/t1_nomixed.txt"
write_8b_config
for cap in 128 64; do
  echo "=== S1 at 16 req/s, long_prefill_token_threshold=$cap"
  timeout 100 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold $cap" \
    --request-rates 16 --num-prompts 400 --input-len 512 --output-len 128 2>&1 \
    | grep -v "INFO:\|uvicorn\|finished (length)" | tee "$OUT/s1_cap$cap.txt" | tail -4
done
