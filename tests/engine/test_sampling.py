"""Sampling: seeds, logprobs against transformers, penalties, min_tokens, n > 1, stop ids."""

from __future__ import annotations

import math

import pytest
import torch

import tiny_models
from kvflow import SamplingParams
from tiny_models import LLM32 as LLM

PROMPTS = [[1, 20, 30, 40, 50], [1, 60], [1] + list(range(100, 140))]


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_model_len=256, seed=0)


def _gen(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = _gen(llm, [PROMPTS[0]], params)[0].outputs[0].token_ids
    again = _gen(llm, [PROMPTS[0]], params)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = _gen(llm, PROMPTS, [params, unseeded, unseeded])[0].outputs[0].token_ids
    assert alone == again == mixed
    other = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                   ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone  # a different seed draws differently (16 tokens from ~420)


def test_logprobs_match_transformers(llm, model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2,
                            ignore_eos=True)
    out = _gen(llm, [PROMPTS[2]], params)[0]
    comp = out.outputs[0]
    ref = tiny_models.hf_logprobs(model_dir, PROMPTS[2] + comp.token_ids)
    n_prompt = len(PROMPTS[2])
    for i, (tok, lp_dict) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[n_prompt - 1 + i]
        assert tok in lp_dict and len(lp_dict) == 3  # greedy token is the top one
        assert lp_dict[tok].rank == 1
        for tid, lp in lp_dict.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4
    assert comp.cumulative_logprob == pytest.approx(
        sum(ref[n_prompt - 1 + i][t].item() for i, t in enumerate(comp.token_ids)), abs=1e-3)
    # Prompt logprobs: None for the first token, then the actual token (+ top-2).
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == n_prompt
    for pos in range(1, n_prompt):
        d = out.prompt_logprobs[pos]
        tok = PROMPTS[2][pos]
        assert tok in d
        assert abs(d[tok].logprob - ref[pos - 1][tok].item()) < 1e-4
        assert d[tok].rank == int((ref[pos - 1] > ref[pos - 1][tok]).sum()) + 1


def test_prompt_logprobs_across_chunks(model_dir):
    llm = LLM(model_dir, max_model_len=256, max_num_batched_tokens=8)
    out = _gen(llm, [PROMPTS[2]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ref = tiny_models.hf_logprobs(model_dir, PROMPTS[2])
    got = [d[PROMPTS[2][p]].logprob for p, d in enumerate(out.prompt_logprobs) if d is not None]
    want = [ref[p - 1][PROMPTS[2][p]].item() for p in range(1, len(PROMPTS[2]))]
    assert got == pytest.approx(want, abs=1e-4)


def test_min_tokens_and_stop_token_ids(llm):
    greedy = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    toks = greedy[0].outputs[0].token_ids
    stop_id = toks[3]
    first = toks.index(stop_id)
    out = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10,
                                                  stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == toks[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens forbids the stop token until then.
    out = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10, min_tokens=10,
                                                  stop_token_ids=[stop_id]))[0].outputs[0]
    assert len(out.token_ids) == 10 and stop_id not in out.token_ids
    assert out.finish_reason == "length" and out.stop_reason is None


def test_eos_stops_unless_ignored(llm):
    toks = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    toks = toks[0].outputs[0].token_ids
    # Bias EOS (id 2) to the top: generation ends at once with finish_reason stop.
    out = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8,
                                                 logit_bias={2: 100.0}))[0].outputs[0]
    assert out.token_ids == [2] and out.finish_reason == "stop" and out.stop_reason is None
    out = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                 logit_bias={2: 100.0}))[0].outputs[0]
    assert out.token_ids == [2] * 8 and out.finish_reason == "length"
    assert toks  # the unbiased run produced tokens


def test_penalties_change_greedy_choice(llm):
    base = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    base = base[0].outputs[0].token_ids
    assert len(set(base)) < len(base), "fixture should repeat itself for this test"
    rep = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                 repetition_penalty=2.0))[0].outputs[0].token_ids
    freq = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                  frequency_penalty=2.0))[0].outputs[0].token_ids
    assert len(set(rep)) > len(set(base)) and len(set(freq)) > len(set(base))


def test_top_k_one_is_greedy_and_allowed_ids(llm):
    greedy = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    topk1 = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=1.5, top_k=1, max_tokens=8,
                                                   ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == topk1[0].outputs[0].token_ids
    allowed = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=8, seed=3,
                                                     allowed_token_ids=[10, 11], ignore_eos=True))
    assert set(allowed[0].outputs[0].token_ids) <= {10, 11}


def test_n_samples_share_prompt_blocks(model_dir):
    llm = LLM(model_dir, max_model_len=256, enable_prefix_caching=False)
    prompt = [1] + list(range(100, 150))  # 51 tokens: 3 full blocks to share
    out = _gen(llm, [prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8,
                                             ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    # Greedy n=2: both equal the n=1 greedy answer.
    g = _gen(llm, [prompt], SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True))[0]
    g1 = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert g.outputs[0].token_ids == g.outputs[1].token_ids == g1.outputs[0].token_ids
    assert llm.llm_engine.scheduler.kv_cache_manager.num_free_blocks == llm.llm_engine.num_blocks


def test_sampler_top_p_min_p_distribution():
    from kvflow.layers.sampler import Sampler, SamplingRow

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        p = SamplingParams(temperature=1.0, top_p=0.7)
        counts[Sampler()(logits, [SamplingRow(p, [], [], gen)]).token_ids[0]] += 1
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > counts[1] > 0
    counts.zero_()
    for _ in range(400):
        p = SamplingParams(temperature=1.0, min_p=0.5)
        counts[Sampler()(logits, [SamplingRow(p, [], [], gen)]).token_ids[0]] += 1
    assert counts[1:].tolist() == [counts[1].item(), 0, 0] and counts[1] > 0
    assert math.isclose(counts[0] / 400, 0.5 / 0.8, abs_tol=0.1)


def test_seeded_sampling_survives_preemption(model_dir):
    """A seeded request draws the same tokens whether or not the pool forced a preemption."""
    prompts = [[1] + list(range(100 + 7 * i, 140 + 7 * i)) for i in range(4)]
    params = [SamplingParams(temperature=1.0, seed=11 + i, max_tokens=40, ignore_eos=True)
              for i in range(4)]
    roomy = LLM(model_dir, max_model_len=128)
    want = [o.outputs[0].token_ids for o in _gen(roomy, prompts, params)]
    tight = LLM(model_dir, max_model_len=128, num_gpu_blocks_override=8)
    got = [o.outputs[0].token_ids for o in _gen(tight, prompts, params)]
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert got == want
    assert not tight.llm_engine.executor.worker.runner._paused_generators


def test_async_scheduling_gives_the_same_outputs_as_sync(model_dir):
    """Scheduling one step ahead changes no output, under preemption and with every feature
    that reads the tokens: penalties (the runner waits for the last step), logprobs, stops."""
    prompts = [[1] + list(range(100 + 7 * i, 140 + 7 * i)) for i in range(4)] + PROMPTS
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.5,
                             frequency_penalty=0.5, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=9, max_tokens=20, logprobs=2, min_tokens=5),
              SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[2, 3, 5, 8]),
              SamplingParams(temperature=1.0, seed=1, top_k=20, max_tokens=16, presence_penalty=1.0,
                             ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]
    results = {}
    for mode in (False, True):
        llm = LLM(model_dir, max_model_len=128, num_gpu_blocks_override=10,
                  async_scheduling=mode)
        assert llm.llm_engine.async_scheduling is mode
        outs = _gen(llm, prompts, params)
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert llm.llm_engine.scheduler.kv_cache_manager.num_free_blocks == 10
        results[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason,
                          [sorted(lp.items()) for lp in o.outputs[0].logprobs or []])
                         for o in outs]
    for sync, asyn in zip(results[False], results[True]):
        assert sync[:2] == asyn[:2]
        for a, b in zip(sync[2], asyn[2]):
            assert [k for k, _ in a] == [k for k, _ in b]
            assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-5)
                       for (_, x), (_, y) in zip(a, b))


def test_async_scheduling_is_on_by_default_for_one_worker(llm):
    assert llm.llm_engine.async_scheduling is True
