"""The multiprocess executor's failure paths: dead or failing ranks, shutdown, bad splits.

A rank that dies or raises must bring the engine down with a RuntimeError
naming it, within seconds, never a hang; shutdown (explicit, by garbage
collection, or at interpreter exit) must leave no process behind; a split
that cannot work must be a ValueError before any process starts.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.core.scheduler import SchedulerOutput
from kvflow.distributed.utils import verify_tensor_parallel_layout
from tp_helpers import generate, is_running, prompts

FAILURE_DEADLINE_S = 20.0
"""A failure must surface well within this (it takes about one second)."""


def _children() -> set[int]:
    """Pids of this process's spawned ranks (not multiprocessing's resource tracker)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if is_running(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if is_running(p)]


def test_killed_worker_stops_engine_naming_rank(checkpoint):
    llm = LLM(checkpoint("llama"), max_model_len=128, tensor_parallel_size=2, device="cpu")
    engine = llm.llm_engine
    pids = engine.executor.worker_pids
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    for i, p in enumerate(prompts()):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    for _ in range(3):  # mid-run: prompts computed, decoding under way
        engine.step()
    assert engine.has_unfinished_requests()
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < FAILURE_DEADLINE_S
    assert _wait_gone(pids) == []  # the surviving rank was stopped too
    # The engine stays down, and says so at once.
    with pytest.raises(RuntimeError, match="rank 1"):
        engine.step()
    engine.shutdown()


def test_worker_exception_stops_engine_with_its_traceback(checkpoint):
    llm = LLM(checkpoint("llama"), max_model_len=128, tensor_parallel_size=2, device="cpu")
    executor = llm.llm_engine.executor
    # A step for a request no worker knows: every rank raises KeyError before any collective.
    bogus = SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=[],
                            num_scheduled_tokens={"no-such-request": 1},
                            total_num_scheduled_tokens=1)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        executor.execute_model(bogus)
    assert time.monotonic() - start < FAILURE_DEADLINE_S
    message = str(info.value)
    assert "failed during execute_model" in message
    assert "rank 0" in message and "KeyError" in message and "no-such-request" in message
    assert _wait_gone(executor.worker_pids) == []


def test_worker_startup_failure_names_rank(tmp_path, checkpoint):
    # A folder with the config but no weights: every rank fails while loading its shard.
    src = checkpoint("llama")
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            os.link(os.path.join(src, name), tmp_path / name)
    with pytest.raises(RuntimeError, match=r"(?s)rank \d .*during startup.*No weights"):
        LLM(str(tmp_path), max_model_len=128, tensor_parallel_size=2, device="cpu")
    assert _wait_gone(list(_children())) == []


def test_unseeded_sampling_matches_tp1_then_garbage_collection_leaves_no_process(checkpoint):
    """Two checks that both need a fresh tp=2 engine, so they share one.

    Unseeded sampling draws from the generator each runner seeds with the
    engine's ``seed`` when its cache is built; on a fresh engine of each kind
    the draws are the same, so are the tokens. Then dropping the LLM is
    enough to stop its processes (explicit shutdown: test_tensor_parallel's
    fixture).
    """
    path = checkpoint("llama")
    tp2 = LLM(path, max_model_len=128, tensor_parallel_size=2, device="cpu", seed=3)
    pids = tp2.llm_engine.executor.worker_pids
    assert all(is_running(p) for p in pids)
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    tokens2 = generate(tp2, prompts(), params)
    # Seeds this process's generator: build last. On the CPU like tp2 (a CUDA generator
    # draws other numbers from the same seed).
    tp1 = LLM(path, max_model_len=128, seed=3, device="cpu")
    assert generate(tp1, prompts(), params) == tokens2
    del tp2
    gc.collect()
    assert _wait_gone(pids, timeout=0.1) == []  # gone by the time collection returns


def test_interpreter_exit_leaves_no_process(checkpoint):
    """A script that never calls shutdown(): its ranks end with it."""
    script = textwrap.dedent(f"""
        from kvflow import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({checkpoint("llama")!r}, max_model_len=128, tensor_parallel_size=2, device="cpu")
            llm.generate({{"prompt_token_ids": [1, 5, 6]}}, SamplingParams(max_tokens=2),
                         use_tqdm=False)
            print("PIDS", *llm.llm_engine.executor.worker_pids, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("PIDS"))
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 2
    assert _wait_gone(pids) == []


# ---------------------------------------------------------------------------- bad splits
@pytest.mark.parametrize("tp, heads, kv_heads, words", [
    (3, 4, 2, "does not divide the model's 4 attention heads"),
    (2, 6, 3, "does not divide the model's 3 KV heads"),
    (3, 6, 2, "larger than the model's 2 KV heads but not a multiple"),
])
def test_layout_rule(tp, heads, kv_heads, words):
    with pytest.raises(ValueError, match=f"tensor_parallel_size={tp} .*{words}"):
        verify_tensor_parallel_layout(tp, heads, kv_heads)


@pytest.mark.parametrize("tp, heads, kv_heads", [(2, 4, 2), (4, 4, 2), (2, 4, 1), (8, 8, 2)])
def test_layout_rule_accepts(tp, heads, kv_heads):
    verify_tensor_parallel_layout(tp, heads, kv_heads)


def test_tp_not_dividing_heads_fails_before_any_process(checkpoint):
    path = checkpoint("llama")
    before = _children()
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's 4"):
        LLM(path, max_model_len=128, tensor_parallel_size=3, device="cpu")
    assert _children() == before


def test_tp_not_dividing_kv_heads_fails_before_any_process(checkpoint):
    path = checkpoint("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    before = _children()
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the model's 3 KV"):
        LLM(path, max_model_len=128, tensor_parallel_size=2, device="cpu")
    assert _children() == before


def test_tp_beyond_visible_gpus(checkpoint, monkeypatch):
    path = checkpoint("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    before = _children()
    with pytest.raises(ValueError, match="tensor_parallel_size=2 exceeds the 1 visible GPUs"):
        LLM(path, max_model_len=128, tensor_parallel_size=2, device="cuda")
    assert _children() == before


def test_ray_backend_without_ray_says_how_to_install(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"kvflow\[ray\]"):
        LLM(checkpoint("llama"), max_model_len=128, tensor_parallel_size=2, device="cpu",
            distributed_executor_backend="ray")
