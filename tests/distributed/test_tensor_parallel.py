"""Tensor parallelism over 2 CPU processes (gloo): same tokens as transformers and as tp=1.

Tiny configs have 4 query heads and 2 KV heads, so tp=2 splits both; a
1-KV-head config checks that a KV head is replicated on every rank. Several
prompts of different lengths run in one batch. Sampling with a seed must
match tp=1 as well: every rank sees the full (all-gathered) logits, and rank
0's choice is the one returned.
"""

from __future__ import annotations

import pytest

import tiny_models
from kvflow import LLM, SamplingParams
from tp_helpers import NEW_TOKENS, generate, greedy, is_running, prompts

CASES = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "llama-1kv": ("llama", {"num_key_value_heads": 1}),
}


@pytest.fixture(scope="module")
def engines(checkpoint):
    """case -> (tp=1 LLM, tp=2 LLM, transformers' greedy tokens); built once, shut down after."""
    made: dict[str, tuple[LLM, LLM, list[list[int]]]] = {}

    def get(case: str):
        if case not in made:
            family, overrides = CASES[case]
            path = checkpoint(family, **overrides)
            expected = tiny_models.hf_greedy(path, prompts(), NEW_TOKENS)
            # Both on the CPU, also where there is a GPU: seeded draws and logprobs are
            # compared, and CPU and CUDA generators (and float16) would differ.
            tp1 = LLM(path, max_model_len=128, device="cpu")
            tp2 = LLM(path, max_model_len=128, tensor_parallel_size=2, device="cpu")
            made[case] = (tp1, tp2, expected)
        return made[case]

    yield get
    # Explicit shutdown returns only once every rank process is gone.
    for _, tp2, _ in made.values():
        pids = tp2.llm_engine.executor.worker_pids
        tp2.llm_engine.shutdown()
        tp2.llm_engine.shutdown()  # twice is harmless
        assert not any(is_running(p) for p in pids)


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_greedy_matches_transformers_and_tp1(case, engines):
    tp1, tp2, expected = engines(case)
    assert tp2.llm_engine.executor.world_size == 2
    batch = prompts()
    assert greedy(tp2, batch) == expected
    assert greedy(tp1, batch) == expected
    # Again: the prompts now hit the prefix cache, which is sharded like the rest of the cache.
    assert greedy(tp2, batch) == expected


def test_tp2_seeded_sampling_matches_tp1(engines):
    tp1, tp2, _ = engines("llama")
    batch = prompts(seed=1)
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=100 + i,
                             max_tokens=NEW_TOKENS, ignore_eos=True) for i in range(len(batch))]
    # n > 1 with a seed: each child draws from its own seeded stream.
    params[0] = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=NEW_TOKENS,
                               ignore_eos=True)
    out1 = tp1.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    out2 = tp2.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    tokens1 = [[c.token_ids for c in o.outputs] for o in out1]
    tokens2 = [[c.token_ids for c in o.outputs] for o in out2]
    assert tokens1 == tokens2
    assert tokens1[0][0] != tokens1[0][1]  # the two children really sampled apart
    # A seed makes the result independent of the rest of the batch, on tp=2 too.
    alone = generate(tp2, [batch[2]], params[2])
    assert alone == [tokens1[2][0]]


def test_tp2_logprobs_match_tp1(engines):
    tp1, tp2, _ = engines("qwen3")
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2,
                            ignore_eos=True)
    batch = prompts()[2:]
    out1 = tp1.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    out2 = tp2.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    for a, b in zip(out1, out2):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for lp_a, lp_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert lp_a.keys() == lp_b.keys()
            for tok in lp_a:
                assert lp_a[tok].logprob == pytest.approx(lp_b[tok].logprob, abs=1e-4)
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs)


def test_tp2_profile_writes_one_trace_per_rank(engines, tmp_path, monkeypatch):
    _, tp2, _ = engines("llama")
    monkeypatch.setenv("KVFLOW_TORCH_PROFILER_DIR", str(tmp_path))
    tp2.start_profile()
    tp2.generate({"prompt_token_ids": prompts()[0]}, SamplingParams(max_tokens=2),
                 use_tqdm=False)
    tp2.stop_profile()
    names = sorted(p.name.split(".")[0] for p in tmp_path.iterdir()
                   if p.name.endswith(".pt.trace.json.gz"))
    assert names == ["rank0", "rank1"]
    assert greedy(tp2, prompts()[:1])  # the ranks still serve
