#!/usr/bin/env bash
# Twenty-second device batch (fourth session): C1 A/B in one machine session -- the
# tokenizer loading beside the model (this tree) against loading it first (.c1old/, an
# export of the commit before) -- and T1 split into prefill-carrying and decode-only steps
# at token budgets 8192 and 16384 (benchmarks/t1_steps.py).
source "$(dirname "$0")/device_env.sh"
echo "=== C1 A/B: compare = tokenizer first (.c1old), kvflow = tokenizer in a thread" | tee -a "$OUT/log.txt"
timeout 260 python3 benchmarks/cold_start.py --runs 2 --skip-hf --compare .c1old 2>&1 | tail -34 | tee -a "$OUT/log.txt"
echo "=== T1 steps" | tee -a "$OUT/log.txt"
timeout 280 python3 benchmarks/t1_steps.py --budgets 8192,16384 2>&1 | tail -6 | tee -a "$OUT/log.txt"
