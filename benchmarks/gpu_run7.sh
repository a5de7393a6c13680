#!/usr/bin/env bash
# Seventh device batch: where T1's time goes (async on/off, step split, trace), bf16 agreement.
source "$(dirname "$0")/device_env.sh"
echo "=== async scheduling A/B, T1 with step split"
timeout 200 python3 benchmarks/async_ab.py --skip L1 2>&1 | grep -v "INFO" | tee "$OUT/async_ab.txt"
echo "=== profile_trace (L1 decode steps, full T1)"
timeout 200 python3 benchmarks/profile_trace.py 2>&1 | grep -v "INFO" | tee "$OUT/trace.txt" | tail -30
echo "=== bf16 agreement, peaked weights"
timeout 150 python3 benchmarks/bf16_agreement.py 2>&1 | grep -v "INFO" | tee "$OUT/bf16.txt" | tail -15
