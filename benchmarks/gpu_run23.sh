#!/usr/bin/env bash
# Twenty-third device batch (fourth session): where T1's decode steps (11.7 ms at batch
# ~126 against an 8.8 ms bandwidth bound) spend their GPU time: profiler trace of the L1
# and T1 regions with the longest kernels listed.
source "$(dirname "$0")/device_env.sh"
timeout 400 python3 benchmarks/profile_trace.py --top 15 2>&1 | grep -v "^\s*$" | grep "^|\|top kernels" | tee "$OUT/trace.txt"
