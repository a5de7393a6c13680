#!/usr/bin/env bash
# Sixth device batch: asynchronous scheduling on the GPU — tests in float32, then L1/T1 A/B.
source "$(dirname "$0")/device_env.sh"
echo "=== pytest on the GPU (float32): core, engine, equivalence"
timeout 240 python3 -m pytest tests/core tests/engine tests/models/test_equivalence.py -x -q -p no:cacheprovider 2>&1 | tail -6
echo "=== async scheduling A/B (L1, T1), llama3-8b shape"
timeout 320 python3 benchmarks/async_ab.py 2>&1 | grep -v "INFO" | tee "$OUT/async_ab.txt" | tail -30
