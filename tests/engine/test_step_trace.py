"""KVFLOW_STEP_TRACE: one line per step, accounting for every token the engine computed."""

from __future__ import annotations

import json

import pytest

from kvflow import SamplingParams
from tiny_models import LLM32 as LLM
from tiny_models import random_prompts


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_trace_accounts_for_every_step_and_token(checkpoint, tmp_path, monkeypatch,
                                                  async_scheduling):
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("KVFLOW_STEP_TRACE", str(path))
    llm = LLM(model=checkpoint("llama"), max_num_batched_tokens=48, max_model_len=256,
              long_prefill_token_threshold=16, async_scheduling=async_scheduling)
    lens = [5, 40, 17, 64]
    max_tokens = [3, 9, 1, 6]
    prompts = random_prompts(300, lens, seed=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
                         for m in max_tokens], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens
    llm.llm_engine.shutdown()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # Every token computed: each prompt once, each output token but the last fed back.
    assert sum(r["tokens"] for r in records) == sum(lens) + sum(m - 1 for m in max_tokens)
    assert [r["step"] for r in records] == list(range(len(records)))
    for r in records:
        assert r["scheduled"] <= r["launched"] <= r["done"]
        assert 1 <= r["reqs"] <= 4 and r["single"] <= r["reqs"] <= r["tokens"] <= 48
        # The prefill cap holds per request: 16 tokens a chunk at most.
        assert r["tokens"] - r["single"] <= 16 * (r["reqs"] - r["single"])
    assert max(r["tokens"] for r in records) > 16  # several chunks shared a step


def test_no_trace_without_the_variable(checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("KVFLOW_STEP_TRACE", raising=False)
    monkeypatch.chdir(tmp_path)
    llm = LLM(model=checkpoint("llama"), max_model_len=128)
    assert not llm.llm_engine.step_trace.enabled
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2),
                 use_tqdm=False)
    assert list(tmp_path.iterdir()) == []
