#!/usr/bin/env bash
# Thirteenth device batch (third session): mixed-graph attention variants by step shape.
source "$(dirname "$0")/device_env.sh"
echo "=== step times by mixed-graph variant"
timeout 200 python3 benchmarks/step_times.py --decodes 1,18,48 --chunks 0,32,64,128 \
  --mixed-variants 1:0,2:0,4:0,4:16,8:16,1:16 2>&1 | grep -v INFO | tee "$OUT/steps.txt"
