#!/usr/bin/env bash
# Thirty-ninth device batch (seventh session): the one-token AWQ GEMV over AutoAWQ's own
# layout (kvflow.kernels.awq_gemv_rows). AWQ L1 (fp16, Llama-2-7B shape) with
# KVFLOW_AWQ_KERNEL=auto and =rows next to the fp16 engine, same run; then the kernel
# sweep per Llama-2-7B linear against the K-packed GEMV and tinygemm.
source "$(dirname "$0")/device_env.sh"
echo "== AWQ fp16 llama2-7b: auto vs rows"
timeout 270 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 --dtype float16 \
  --awq-kernels auto,rows > $OUT/awq39.log 2>&1
grep -E "^\| L1|Error|error|Traceback" $OUT/awq39.log | tail -8
echo "== rows kernel sweep, llama2-7b, one token"
timeout 170 python3 benchmarks/kernels/bench_awq_rows.py --model llama2-7b --sweep \
  --json $OUT/rows39.json > $OUT/rows39.log 2>&1
grep -E "sweep \(best|^\||FAIL|four linears|Error|error" $OUT/rows39.log | tail -20
