#!/usr/bin/env bash
# Thirty-sixth device batch (sixth session): why the batch-1 int4 GEMVs stop at ~50% of
# copy bandwidth. Nsight Compute counters of tinygemm, the K-packed GEMV and the new half2
# GEMV (llama2-7b qkv and gate_up); the GEMV sweep with the half2 kernel. Ran on the tree of
# commit a723fbf: the half2 kernel and --h2 were removed after it (history: dce21de).
source "$(dirname "$0")/device_env.sh"
git log -1 --format=%h
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 120 "$NCU" --clock-control none -k regex:"awq_gemv|tinygemm|int4" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats python3 benchmarks/kernels/ncu_awq.py --shapes qkv,gate_up \
  > $OUT/ncu.txt 2>&1
grep -E "^  [_a-zA-Z].*\(|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occ|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Block Limit Reg|Grid Size|Waves Per SM" $OUT/ncu.txt | head -150
timeout 300 python3 benchmarks/kernels/bench_awq_gemv.py --model llama2-7b --tokens 1 --sweep --short-sweep --h2 \
  --json $OUT/sweep36.json > $OUT/sweep36.log 2>&1
grep -E "sweep \(best|: tinygemm|: h2|^\||FAIL|four linears|copy" $OUT/sweep36.log | tail -40
