#!/usr/bin/env bash
# Thirty-first device batch (fifth session): run 29 read L1 5.90 -> 6.03 ms. Which part:
# the split minimum swept at the graphs' pinned split counts (GQA 8 and MHA 32), then L1
# with SPLIT_MIN_KEYS = 256 (this tree) and = 0 (a copy of it, /tmp/alt), the AWQ L1 on
# the Llama-2-7B shape, and the GPU tests run 29's limit cut (full log in $OUT).
source "$(dirname "$0")/device_env.sh"
timeout 70 python3 benchmarks/kernels/bench_attention.py --graph-splits --batches 1,4 --contexts 256,512,1024,2048,8192 2>&1 | grep "^|\|Error" 
timeout 40 python3 benchmarks/kernels/bench_attention.py --graph-splits --kv-heads 32 --batches 1 --contexts 256,512,1024,4096 2>&1 | grep "^|\|Error" | tail -4
mkdir -p /tmp/alt && cp -r kvflow /tmp/alt/ && sed -i 's/^SPLIT_MIN_KEYS = 256$/SPLIT_MIN_KEYS = 0/' /tmp/alt/kvflow/kernels/paged_attention.py && grep -c "^SPLIT_MIN_KEYS = 0" /tmp/alt/kvflow/kernels/paged_attention.py
echo "== L1 SPLIT_MIN_KEYS 256"
timeout 80 python3 benchmarks/gpu_suite.py --skip L1hf,T1,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^| L1" | tail -3
echo "== L1 SPLIT_MIN_KEYS 0"
PYTHONPATH=/tmp/alt:$PYTHONPATH timeout 80 python3 benchmarks/gpu_suite.py --skip L1hf,T1,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^| L1" | tail -3
echo "== Q1 llama2-7b bf16 this tree"
timeout 170 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype bfloat16 --awq-kernels int4pack 2>&1 | grep "^| L1" | tail -7
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_reshape_and_cache.py tests/kernels/test_graph_padding.py tests/kernels/test_kernel_triton_backend.py tests/engine/test_cuda_graphs_gpu.py > $OUT/tests31.log 2>&1; tail -3 $OUT/tests31.log
