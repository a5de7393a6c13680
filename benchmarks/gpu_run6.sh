#!/usr/bin/env bash
# Sixth device batch: asynchronous scheduling on the GPU — tests in float32, then L1/T1 A/B.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
git log --oneline | head -1
echo "=== pytest on the GPU (float32): core, engine, equivalence"
timeout 240 python3 -m pytest tests/core tests/engine tests/models/test_equivalence.py -x -q -p no:cacheprovider 2>&1 | tail -6
echo "=== async scheduling A/B (L1, T1), llama3-8b shape"
timeout 320 python3 benchmarks/async_ab.py 2>&1 | grep -v "INFO" | tee "$OUT/async_ab.txt" | tail -30
