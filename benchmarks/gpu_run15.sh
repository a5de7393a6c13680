#!/usr/bin/env bash
# Fifteenth device batch (third session, closing figures): AWQ auto by dtype, S1 as
# BENCHMARKS.md runs it (500 requests, rates 16 / 4 / inf, offline ceiling) with a 64-token
# prefill cap, and the default server (no cap) at 16 / inf.
source "$(dirname "$0")/device_env.sh"
echo "=== pytest AWQ GEMV / auto on CUDA"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/quantization/test_awq_gemv.py 2>&1 | tail -3
echo "=== AWQ L1 float16 auto (K-packed GEMV at one token) vs triton, bf16/fp16 peer"
timeout 110 python3 benchmarks/awq_bench.py --quick --skip T1 --dtype float16 --awq-kernels auto,triton 2>&1 | grep "L1" | tee "$OUT/awq_fp16.txt"
write_8b_config
echo "=== S1 cap 64: rates 16, 4, inf + offline ceiling"
timeout 260 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold 64" \
  --offline-ceiling --request-rates 16 4 inf --num-prompts 500 --input-len 512 --output-len 128 2>&1 \
  | grep -v "INFO:\|uvicorn\|finished (length)" | tee "$OUT/s1_cap64.txt" | tail -6
echo "=== S1 default (no cap): rates 16, inf"
timeout 110 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048" \
  --request-rates 16 inf --num-prompts 500 --input-len 512 --output-len 128 2>&1 \
  | grep -v "INFO:\|uvicorn\|finished (length)" | tee "$OUT/s1_default.txt" | tail -5
