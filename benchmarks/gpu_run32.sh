#!/usr/bin/env bash
# Thirty-second device batch (fifth session): the split-KV minimum reverted (run 31). Decode
# attention with the split count pinned as graphs pin it (4..32) at batch 1 and 4, the GPU
# tests of the touched code (log in $OUT), then L1 and T1 of this tree.
source "$(dirname "$0")/device_env.sh"
timeout 90 python3 benchmarks/kernels/bench_attention.py --splits 4,8,16,32 --batches 1,4 --contexts 512,2048,8192,32768 2>&1 | grep "^|\|Error"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_graph_padding.py tests/kernels/test_kernel_triton_backend.py tests/engine/test_cuda_graphs_gpu.py tests/kernels/test_kernel_reshape_and_cache.py tests/kernels/test_kernel_paged_attention.py -k "not gpu_large" > $OUT/tests32.log 2>&1; tail -3 $OUT/tests32.log
timeout 150 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -6
