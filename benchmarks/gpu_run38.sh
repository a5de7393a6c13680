#!/usr/bin/env bash
# Thirty-eighth device batch (sixth session): programmatic dependent launch now on by
# default and the AWQ GEMV's new one-token tiles. GPU tests first (PDL results bit-equal
# in a CUDA graph, graphs, attention, AWQ GEMV on the new tiles), then L1 on the
# Llama-3-8B shape with PDL on (default) and off, then AWQ L1 (fp16, Llama-2-7B shape).
source "$(dirname "$0")/device_env.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/kernels/test_pdl.py \
  tests/engine/test_cuda_graphs_gpu.py tests/quantization/test_awq_gemv.py \
  tests/kernels/test_kernel_paged_attention.py -k "not gpu_large" 2>&1 | tail -4
for flag in 1 0; do
  echo "== L1 llama3-8b, KVFLOW_PDL=$flag"
  KVFLOW_PDL=$flag timeout 75 python3 benchmarks/gpu_suite.py --skip L1hf,T1,T1hf,T2,T2hf,C1,K1 \
    2>&1 | grep "^| L1" | tail -3
done
echo "== AWQ fp16 llama2-7b (PDL on, new tiles)"
timeout 200 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype float16 \
  --awq-kernels auto > $OUT/awq38.log 2>&1
grep -E "^\| L1|Error|error|Traceback" $OUT/awq38.log | tail -6
echo "== K-packed GEMV tiles with more rows a thread (x reuse), llama2-7b, one token"
timeout 150 python3 benchmarks/kernels/bench_awq_gemv.py --model llama2-7b --tokens 1 --sweep \
  --configs "128,128,1,4,1;128,128,4,4,1;128,128,8,4,1;128,128,1,2,1;128,128,4,2,1;128,128,8,2,1;256,128,1,4,1;256,128,4,4,1;256,128,8,4,1;256,128,4,8,1;128,256,1,4,2;128,256,4,4,2;64,128,8,4,1" \
  > $OUT/sweep38.log 2>&1
grep -E "sweep \(best|^\||FAIL|four linears" $OUT/sweep38.log | tail -12
