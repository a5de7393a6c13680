#!/usr/bin/env bash
# Thirty-fourth device batch (fifth session): T1 with its transformers generate_batch peer
# in the same run (this session's tree: decode order, graph split counts).
source "$(dirname "$0")/device_env.sh"
timeout 220 python3 benchmarks/gpu_suite.py --skip L1,L1hf,T2,T2hf,C1,K1 2>&1 | grep "^|" | tail -6
