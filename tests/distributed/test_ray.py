"""The Ray executor on a real local Ray cluster (CPU, gloo): same tokens, failures, cleanup.

Skipped only where Ray is not installed; where it is, this starts an actual
cluster (raylet, GCS, one actor per rank), so it is slower than the others.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import tiny_models
from kvflow import LLM, SamplingParams
from tp_helpers import NEW_TOKENS, greedy, is_running, prompts

import ray  # noqa: E402  (a test dependency: kvflow[test] installs it)


def test_ray_tp2_matches_transformers_then_fails_cleanly(checkpoint):
    path = checkpoint("qwen3")
    expected = tiny_models.hf_greedy(path, prompts(), NEW_TOKENS)
    assert not ray.is_initialized()
    llm = LLM(path, max_model_len=128, tensor_parallel_size=2, device="cpu",
              distributed_executor_backend="ray")
    engine = llm.llm_engine
    executor = engine.executor
    assert type(executor).__name__ == "RayExecutor" and ray.is_initialized()
    pids = executor.worker_pids
    assert len(set(pids)) == 2 and os.getpid() not in pids  # two actor processes, not us
    assert greedy(llm, prompts()) == expected

    # Kill rank 1's actor mid-run: the engine stops and names it.
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": prompts()[3]}, params)
    engine.step()
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 30
    # The failure shut everything down, the local cluster this engine started included.
    assert not ray.is_initialized()
    deadline = time.monotonic() + 10
    while any(is_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_running(p) for p in pids)
    engine.shutdown()  # after a failure: harmless
