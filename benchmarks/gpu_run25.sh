#!/usr/bin/env bash
# Twenty-fifth device batch (fourth session): L1 and T1 with two-stage decode attention
# tiles (run 24's sweep), kvflow only, and the attention/graph tests on the GPU.
source "$(dirname "$0")/device_env.sh"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_paged_attention.py tests/engine/test_cuda_graphs_gpu.py 2>&1 | tail -2
timeout 300 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -8
