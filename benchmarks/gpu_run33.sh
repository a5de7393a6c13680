#!/usr/bin/env bash
# Thirty-third device batch (fifth session): decode graphs of batch 1-4 captured with up to
# 32 splits (run 32's sweep). GPU tests of graphs and the touched kernels (log in $OUT),
# then L1 and T1 of this tree.
source "$(dirname "$0")/device_env.sh"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda_graphs_gpu.py tests/kernels/test_kernel_reshape_and_cache.py tests/kernels/test_kernel_paged_attention.py -k "graph or rotary or decode_order or split or padding or write" > $OUT/tests33.log 2>&1; tail -3 $OUT/tests33.log
timeout 150 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -6
