#!/usr/bin/env bash
# Twenty-eighth device batch (fifth session): Q1 on the Llama-2-7B shape (the seed's
# TheBloke/Llama-2-7b-Chat-AWQ), in float16 as the checkpoint declares and in bfloat16
# (tinygemm), and where an AWQ decode step's time goes (profile, longest kernels).
source "$(dirname "$0")/device_env.sh"
timeout 240 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype float16 --awq-kernels auto 2>&1 | grep -v "^$" | tail -8
timeout 150 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype bfloat16 --awq-kernels int4pack 2>&1 | grep "^|" | tail -4
timeout 120 python3 benchmarks/profile_trace.py --model /tmp/kvflow-awq-bench/llama2-7b-awq-g128 --dtype bfloat16 --skip-t1 --top 40 2>&1 | grep "^|\|^L1" | tail -48
