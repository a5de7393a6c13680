"""Start-up leaves nothing to a request's first step: the eager tail warmed, the heap frozen.

On CPU: which row counts the sampling warm-up runs, that it changes no result, and that
the start-up heap freeze collects garbage first (offline engines do not freeze). On a
GPU: after start-up, a workload of varied batch sizes and sampling parameters, within
the CUDA graphs, compiles no Triton kernel (a first call mid-serving stalled a step by
50-470 ms on the H100).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import tiny_models
from kvflow import SamplingParams
from tiny_models import LLM32 as LLM


def _runner(llm):
    return llm.llm_engine.executor.worker.runner


def test_sampling_warm_up_row_counts_and_no_effect_on_results(checkpoint):
    path = checkpoint("llama")
    prompts = tiny_models.random_prompts(420, [3, 17, 40])
    llm = LLM(path, max_model_len=128)
    before = tiny_models.kvflow_greedy(llm, prompts, 6)
    runner = _runner(llm)
    assert runner.warm_up_sampling(40) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 40]
    assert runner.warm_up_sampling(5) == [1, 2, 3, 4, 5]
    assert runner.warm_up_sampling(64) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 64]
    assert tiny_models.kvflow_greedy(llm, prompts, 6) == before
    llm.llm_engine.scheduler.check_integrity()


def test_freeze_collects_garbage_first_and_offline_engines_do_not_freeze(checkpoint):
    from kvflow.gc_freeze import freeze_startup_heap

    gc.unfreeze()
    try:
        LLM(checkpoint("llama"), max_model_len=128)
        assert gc.get_freeze_count() == 0  # offline: `del llm; gc.collect()` must free it

        class Node:
            pass

        cycle = Node()
        cycle.self = cycle
        ref = weakref.ref(cycle)
        del cycle  # garbage now, but only a collection can free a cycle
        assert ref() is not None
        assert freeze_startup_heap("test") > 10_000  # torch, transformers, the model
        assert ref() is None  # collected before the freeze, not frozen for ever
    finally:
        gc.unfreeze()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles happen on a GPU only")
@pytest.mark.parametrize("budget", [256, 2048])  # 2048: steps over 512 tokens run eagerly
def test_no_triton_compile_after_start_up(checkpoint, budget):
    from triton import knobs

    llm = LLM(checkpoint("llama"), max_model_len=256, max_num_batched_tokens=budget,
              max_num_seqs=32, dtype="bfloat16")
    compiled: list[str] = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *a, **kw: compiled.append(str(kw.get("fn", a)))
    try:
        sampling = [SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
                    SamplingParams(temperature=1.0, top_p=0.8, top_k=5, max_tokens=5,
                                   ignore_eos=True, seed=3),
                    SamplingParams(temperature=0.7, logprobs=3, max_tokens=4, ignore_eos=True)]
        for batch in (1, 2, 5, 9, 17, 30):
            lens = [3 + (37 * i) % 240 for i in range(batch)]
            prompts = tiny_models.random_prompts(420, lens, seed=batch)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                [sampling[i % 3] for i in range(batch)], use_tqdm=False)
            assert all(o.finished for o in outs)
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == [], f"{len(compiled)} Triton compiles after start-up: {compiled[:3]}"


def test_eager_warm_up_runs_every_tile_bucket_and_writes_no_cache(checkpoint):
    """The eager warm-up through the Triton backend (on CPU: Triton's interpreter): every
    query-length bucket runs, and nothing lands in the KV cache (padding slots -1)."""
    from kvflow.attention.backends.triton import TritonAttentionBackend
    from kvflow.config import EngineArgs
    from kvflow.models.base import ModelContext
    from kvflow.models.loader import load_model
    from kvflow.worker.model_runner import ModelRunner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mc = EngineArgs(model=checkpoint("llama"), dtype="float32",
                    attention_backend="torch").create_engine_config().model_config
    model = load_model(mc, ModelContext(dtype=torch.float32,
                                        attn_backend=TritonAttentionBackend()), device)
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, 80, 4, mc.num_kv_heads, mc.head_dim, generator=gen).to(device)
              for _ in range(mc.num_layers)]
    before = [c.clone() for c in caches]
    runner = ModelRunner(model, caches, 4, device, seed=0)
    assert runner.warm_up_eager() == [2, 4, 8, 16, 32, 64, 128]
    assert all(torch.equal(a, b) for a, b in zip(before, caches))
