#!/usr/bin/env bash
# Twenty-fourth device batch (fourth session): decode attention at T1's batch sizes and
# contexts (run 23: 27% of T1's GPU time, ~75% of copy bandwidth), all 18 decode tiles.
source "$(dirname "$0")/device_env.sh"
timeout 300 python3 benchmarks/kernels/bench_attention.py --tune --decode-only --batches 64,128 --contexts 512,768,1024 2>&1 | grep -v "^\s*$" | tee "$OUT/attn.txt"
