#!/usr/bin/env bash
# Tenth device batch (third session): CUDA graphs for mixed prefill/decode steps.
# Correctness first (GPU tests of the new graphs + equivalence), then L1/T1 against the
# previous figures, then S1 at 16 req/s without and with a prefill cap per step.
source "$(dirname "$0")/device_env.sh"
echo "=== pytest: mixed graphs, padding, equivalence (float32 on the GPU)"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_cuda_graphs_gpu.py \
  tests/kernels/test_graph_padding.py tests/engine/test_cuda_graph_sizes.py \
  tests/models/test_equivalence.py 2>&1 | tail -15 | tee "$OUT/pytest.txt"
echo "=== suite --quick: L1, T1 (no peers: same-run peers are in gpu_run8/9)"
timeout 200 python3 benchmarks/gpu_suite.py --quick --skip L1hf,T1hf,T2,T2hf,C1,K1 2>&1 \
  | grep -v "INFO" | tee "$OUT/suite.txt" | tail -25
write_8b_config
for cap in 0 256 128; do
  echo "=== S1 at 16 req/s, long_prefill_token_threshold=$cap"
  timeout 110 python3 benchmarks/serving.py --serve-args "/tmp/m8b --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --long-prefill-token-threshold $cap" \
    --request-rates 16 --num-prompts 400 --input-len 512 --output-len 128 2>&1 \
    | grep -v "INFO:\|uvicorn" | tee "$OUT/s1_cap$cap.txt" | tail -14
done
