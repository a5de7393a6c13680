"""Per-phase request histograms (queue, prefill, decode, time per output token): the
engine stamps each phase and the server's metrics split a request's life by them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvflow import SamplingParams
from kvflow.engine.llm_engine import EngineStats
from kvflow.entrypoints.openai.metrics import ServerMetrics
from kvflow.outputs import RequestMetrics
from tiny_models import LLM32 as LLM


def test_engine_stamps_every_phase_in_order(tiny_model):
    llm = LLM(tiny_model, max_model_len=128, max_num_batched_tokens=16)
    prompts = [{"prompt_token_ids": [1] + [5 + i] * 30} for i in range(3)]  # chunked prefill
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    for out in outs:
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time


def test_observe_finished_splits_a_request_by_phase():
    idle = EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, prompt_tokens_total=0,
                       generation_tokens_total=0, num_preemptions=0, prefix_cache_queries=0,
                       prefix_cache_hits=0)
    metrics = ServerMetrics(SimpleNamespace(get_stats=lambda: idle), "m")
    timeline = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5,
                              first_token_time=11.25, last_token_time=13.25,
                              finished_time=13.25, token_times=[11.25, 12.25, 13.25])
    metrics.observe_finished(timeline, num_prompt_tokens=7, num_output_tokens=5,
                             finish_reason="length")

    def total(name: str) -> float:
        return metrics.registry.get_sample_value(f"kvflow:{name}_sum", {"model_name": "m"})

    assert total("request_queue_time_seconds") == pytest.approx(0.5)
    assert total("request_prefill_time_seconds") == pytest.approx(0.75)
    assert total("request_decode_time_seconds") == pytest.approx(2.0)
    assert total("request_time_per_output_token_seconds") == pytest.approx(0.5)  # 2 s / 4
    assert total("e2e_request_latency_seconds") == pytest.approx(3.25)
