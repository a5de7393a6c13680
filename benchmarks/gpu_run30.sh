#!/usr/bin/env bash
# Thirtieth device batch (fifth session): run 29's L1/T1 of the starting tree (.c1old),
# then Q1 on the Llama-2-7B shape (bf16, tinygemm) with this tree and the starting tree,
# and the AWQ decode step's longest kernels with this tree.
source "$(dirname "$0")/device_env.sh"
echo "== L1/T1 before (.c1old)"
PYTHONPATH=$PWD/.c1old:$PYTHONPATH timeout 150 python3 benchmarks/gpu_suite.py --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -6
echo "== Q1 llama2-7b this tree"
timeout 200 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype bfloat16 --awq-kernels int4pack 2>&1 | grep "^| L1" | tail -7
echo "== Q1 llama2-7b before (.c1old)"
PYTHONPATH=$PWD/.c1old:$PYTHONPATH timeout 120 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype bfloat16 --awq-kernels int4pack 2>&1 | grep "^| L1" | tail -7
timeout 80 python3 benchmarks/profile_trace.py --model /tmp/kvflow-awq-bench/llama2-7b-awq-g128 --dtype bfloat16 --skip-t1 --top 12 2>&1 | grep "^|\|^L1" | tail -16
