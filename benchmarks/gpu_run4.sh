#!/usr/bin/env bash
# Fourth device batch: kvflow L1/T1 on this card (for S1's baseline), AWQ Q1, TP overhead.
source "$(dirname "$0")/device_env.sh"
echo "=== suite (kvflow only)"
timeout 150 python3 benchmarks/gpu_suite.py --quick --skip L1hf,T1hf 2>&1 | tee "$OUT/suite4.txt" | tail -12
echo "=== TP overhead"
timeout 120 python3 benchmarks/tp_overhead.py 2>&1 | tee "$OUT/tp.txt" | tail -12
echo "=== AWQ Q1"
timeout 280 python3 benchmarks/awq_bench.py --quick 2>&1 | tee "$OUT/awq_q1.txt" | tail -25
