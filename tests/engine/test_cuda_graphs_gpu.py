"""CUDA graphs of mixed prefill/decode steps on the GPU: same tokens as transformers.

A small token budget makes most steps carry a prefill chunk beside decodes, so they
replay mixed graphs (padded tokens, padding requests with no token); the result must
equal transformers' greedy tokens and the eager engine's, and no block may leak.
The padding itself is checked on CPU (tests/kernels/test_graph_padding.py).
"""

from __future__ import annotations

import pytest
import torch

import tiny_models
from tiny_models import LLM32 as LLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

NEW_TOKENS = 10


def _graph_runner(llm):
    return llm.llm_engine.executor.worker.runner.graph_runner


@pytest.mark.parametrize("budget,async_scheduling", [(24, True), (24, False), (64, True)])
def test_mixed_graph_steps_match_transformers(checkpoint, budget, async_scheduling):
    path = checkpoint("llama")
    prompts = tiny_models.random_prompts(420, [1, 3, 17, 40, 100, 5, 29])
    expected = tiny_models.hf_greedy(path, prompts, NEW_TOKENS)
    llm = LLM(path, max_model_len=256, max_num_batched_tokens=budget, max_num_seqs=8,
              async_scheduling=async_scheduling)
    graphs = _graph_runner(llm)
    assert graphs is not None and graphs.mixed_sizes[-1] == budget
    assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected
    assert graphs.replays["mixed"] > 0 and graphs.replays["decode"] > 0
    llm.llm_engine.scheduler.check_integrity()

    eager = LLM(path, max_model_len=256, max_num_batched_tokens=budget, max_num_seqs=8,
                enforce_eager=True)
    assert _graph_runner(eager) is None
    assert tiny_models.kvflow_greedy(eager, prompts, NEW_TOKENS) == expected
