#!/usr/bin/env bash
# Twenty-seventh device batch (fifth session): decode attention programs started longest
# context first (decode_order). Tests on the GPU, the kernel alone at T1's ragged contexts
# (batch order vs longest first), then L1 and T1: this tree, and the tree before the change
# (.c1old, carried) in the same run.
source "$(dirname "$0")/device_env.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_paged_attention.py tests/kernels/test_graph_padding.py tests/engine/test_cuda_graphs_gpu.py 2>&1 | tail -2
timeout 90 python3 benchmarks/kernels/bench_attention.py --ragged 100-1280 --batches 32,64,128,192,256 2>&1 | grep -v "^$" | tail -14
echo "== T1/L1 this tree"
timeout 150 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -6
echo "== T1/L1 before (.c1old)"
PYTHONPATH=$PWD/.c1old:$PYTHONPATH timeout 150 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -6
