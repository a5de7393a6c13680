#!/usr/bin/env bash
# Thirty-seventh device batch (sixth session): Q1 on the Llama-2-7B shape in float16 (as
# TheBloke/Llama-2-7b-Chat-AWQ declares): the unquantized engine and AWQ `auto` (K-packed
# GEMV at one token) in one run, with programmatic dependent launch off, then on.
source "$(dirname "$0")/device_env.sh"
git log -1 --format=%h
for flag in 0 1; do
  echo "== KVFLOW_PDL=$flag"
  KVFLOW_PDL=$flag timeout 250 python3 benchmarks/awq_bench.py --shape llama2-7b --quick --skip T1 \
    --dtype float16 --awq-kernels auto > $OUT/awq37_pdl$flag.log 2>&1
  grep -E "^\| L1|Error|error|Traceback" $OUT/awq37_pdl$flag.log | tail -12
done
