#!/usr/bin/env bash
# Fifth device batch: ALiBi kernel tests on the GPU, L1/T1 on the MPT-7B shape (issue 7).
source "$(dirname "$0")/device_env.sh"
echo "=== MPT-7B shape: kvflow L1/T1, HF eager L1"
timeout 330 python3 benchmarks/gpu_suite.py --quick --shape mpt-7b --skip T1hf 2>&1 | tee "$OUT/mpt.txt" | tail -14


