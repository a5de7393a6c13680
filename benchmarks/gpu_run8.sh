#!/usr/bin/env bash
# Eighth device batch (closing figures): suite L1/T1 with peers, AWQ Q1, S1 serving.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "=== suite --quick: ceilings, L1 + HF eager, T1 + HF generate_batch, M1"
timeout 280 python3 benchmarks/gpu_suite.py --quick --skip T2,T2hf 2>&1 | grep -v INFO | tee "$OUT/suite.txt"
echo "=== Q1 AWQ (quick)"
timeout 130 python3 benchmarks/awq_bench.py --quick 2>&1 | grep -v INFO | tee "$OUT/awq.txt" | tail -12
echo "=== S1 serving vs offline"
mkdir -p /tmp/m8b && python3 -c "import json,sys; sys.path.insert(0,'benchmarks'); from gpu_suite import SHAPES; json.dump(SHAPES['llama3-8b'], open('/tmp/m8b/config.json','w'))"
timeout 200 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048" \
  --offline-ceiling --request-rates inf 16 --num-prompts 500 --input-len 512 --output-len 128 2>&1 | grep -v INFO | tee "$OUT/s1.txt" | tail -25
