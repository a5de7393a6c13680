#!/usr/bin/env bash
# Prepared in the fifth session for the next GPU session (not yet run): programmatic
# dependent launch (KVFLOW_PDL=1, kvflow/kernels/pdl.py) against plain launches, same call.
# GPU test of PDL (bit-equal results in a CUDA graph), the kernel tests with PDL on, then L1
# (bf16, every linear a Triton GEMV at batch 1) and AWQ L1 in float16 (K-packed GEMV).
source "$(dirname "$0")/device_env.sh"
KVFLOW_PDL=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_pdl.py tests/engine/test_cuda_graphs_gpu.py tests/kernels/test_kernel_paged_attention.py -k "not gpu_large" 2>&1 | tail -3
for flag in 0 1; do
  echo "== KVFLOW_PDL=$flag"
  KVFLOW_PDL=$flag timeout 100 python3 benchmarks/gpu_suite.py --skip L1hf,T1,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^| L1" | tail -3
done
for flag in 0 1; do
  echo "== AWQ fp16, KVFLOW_PDL=$flag"
  KVFLOW_PDL=$flag timeout 200 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype float16 --awq-kernels auto 2>&1 | grep "^| L1" | tail -7
done
