# Sourced by the benchmarks/gpu_run*.sh device batches: what every batch needs first.
# $OUT collects logs (the device tool brings it back); wheels carried in .whl/ (pytest,
# fastapi, ...: not installed on the GPU machines) go to /tmp/site; the GPU's name heads
# the log so each figure can name its card.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader

# The Llama-3-8B shape's config.json in /tmp/m8b, for `kvflow serve /tmp/m8b --load-format dummy`.
write_8b_config() {
  mkdir -p /tmp/m8b
  python3 -c "import json,sys; sys.path.insert(0,'benchmarks'); from gpu_suite import SHAPES; json.dump(SHAPES['llama3-8b'], open('/tmp/m8b/config.json','w'))"
}
