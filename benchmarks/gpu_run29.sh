#!/usr/bin/env bash
# Twenty-ninth device batch (fifth session): rotary fused into the KV-cache write, split-KV
# partitions of >= 256 keys inside the kernel (graphs pin the split count), decode order.
# GPU tests of the touched kernels, the split minimum swept at the graphs' split counts,
# then L1/T1 of this tree against the session's starting tree (.c1old) in the same run.
source "$(dirname "$0")/device_env.sh"
timeout 270 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_paged_attention.py tests/kernels/test_kernel_reshape_and_cache.py tests/kernels/test_graph_padding.py tests/kernels/test_kernel_triton_backend.py tests/engine/test_cuda_graphs_gpu.py 2>&1 | tail -3
timeout 60 python3 benchmarks/kernels/bench_attention.py --graph-splits --batches 1,4 --contexts 256,512,1024,2048,8192 2>&1 | grep "^|" 
timeout 40 python3 benchmarks/kernels/bench_attention.py --graph-splits --kv-heads 32 --batches 1 --contexts 256,512,1024,4096 2>&1 | grep "^|" | tail -4
echo "== L1/T1 this tree"
timeout 150 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -6
