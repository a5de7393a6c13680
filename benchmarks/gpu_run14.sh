#!/usr/bin/env bash
# Fourteenth device batch (third session): the whole test suite on the GPU (with the mixed
# CUDA graphs), then the K-packed AWQ GEMV: its sweep against tinygemm, and AWQ L1 vs bf16.
bash "$(dirname "$0")/gpu_tests.sh"
source "$(dirname "$0")/device_env.sh" >/dev/null
echo "=== AWQ K-packed GEMV sweep vs tinygemm"
timeout 130 python3 benchmarks/kernels/bench_awq_gemv.py --sweep --json "$OUT/awq_sweep.json" 2>&1 | grep -v INFO | tee "$OUT/awq_gemv.txt" | tail -30
echo "=== AWQ L1 (gemv, int4pack) vs bf16, same run"
timeout 150 python3 benchmarks/awq_bench.py --quick --skip T1 --awq-kernels gemv,int4pack 2>&1 | grep -v INFO | tee "$OUT/awq_l1.txt" | tail -14
