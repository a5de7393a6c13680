#!/usr/bin/env bash
# Twenty-sixth device batch (fourth session): C1 with kvflow and the carried packages
# byte-compiled first, as pip leaves an install (runs 20-22 compiled them from source at
# every start: carried wheels are installed --no-compile, PYTHONDONTWRITEBYTECODE=1).
source "$(dirname "$0")/device_env.sh"
timeout 280 python3 benchmarks/cold_start.py --runs 2 --skip-hf 2>&1 | tail -34
