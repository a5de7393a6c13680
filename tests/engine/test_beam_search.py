"""LLM.beam_search (vLLM's) against transformers' num_beams search, and its own rules."""

from __future__ import annotations

import math

import pytest
import torch

import tiny_models
from kvflow import SamplingParams, TokensPrompt
from kvflow.sampling_params import BeamSearchParams
from tiny_models import LLM32 as LLM

PROMPT_LENS = [7, 12]


@pytest.fixture(scope="module")
def setup(checkpoint):
    path = checkpoint("llama")
    llm = LLM(path, max_model_len=128)
    vocab = llm.llm_engine.config.model_config.vocab_size
    return path, llm, tiny_models.random_prompts(vocab, PROMPT_LENS, seed=3)


def _hf_beams(path: str, prompt: list[int], width: int, new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), num_beams=width,
                           num_return_sequences=width, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           length_penalty=0.0, eos_token_id=None, pad_token_id=0)
    return [row[len(prompt):].tolist() for row in y]


def test_matches_transformers_num_beams(setup):
    """No EOS, length_penalty 0: both run the textbook search; same beams, same order."""
    path, llm, prompts = setup
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True, length_penalty=0.0)
    outs = llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        ours = [seq.tokens[len(prompt):] for seq in out.sequences]
        assert ours == _hf_beams(path, prompt, 3, 5)
        scores = [seq.cum_logprob for seq in out.sequences]
        assert scores == sorted(scores, reverse=True)
        for seq in out.sequences:  # each beam's sum is its own tokens' log-probabilities
            picked = [lp[t].logprob for lp, t in zip(seq.logprobs, seq.tokens[len(prompt):])]
            assert math.isclose(seq.cum_logprob, sum(picked), rel_tol=1e-6, abs_tol=1e-6)
            assert seq.finish_reason == "length" and len(seq.logprobs) == 5
    llm.llm_engine.scheduler.check_integrity()


def test_width_one_is_greedy(setup):
    _, llm, prompts = setup
    greedy = tiny_models.kvflow_greedy(llm, prompts, 6)
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=6,
                                                     ignore_eos=True))
    assert [o.sequences[0].tokens[len(p):] for o, p in zip(outs, prompts)] == greedy


def test_eos_ends_a_beam_and_leaves_the_text(setup, monkeypatch):
    """A beam that takes EOS is complete: kept aside, ranked with EOS not counted in its
    length, its text without EOS (unless include_stop_str_in_output). EOS is made the
    prompt's greedy next token, so the best first step takes it."""
    _, llm, prompts = setup
    tok = llm.get_tokenizer()
    prompt = prompts[0]
    eos = tiny_models.kvflow_greedy(llm, [prompt], 1)[0][0]
    monkeypatch.setattr(llm.llm_engine, "eos_token_ids", [eos])
    for include in (False, True):
        out = llm.beam_search([prompt], BeamSearchParams(
            beam_width=3, max_tokens=4, length_penalty=0.0,
            include_stop_str_in_output=include))[0]
        done = [s for s in out.sequences if s.finish_reason == "stop"]
        live = [s for s in out.sequences if s.finish_reason == "length"]
        assert done and done[0].tokens == prompt + [eos] and done[0].stop_reason == eos
        assert done[0].text == tok.decode([eos] if include else [])
        for seq in live:  # four tokens, none of them EOS
            assert len(seq.tokens) == len(prompt) + 4 and eos not in seq.tokens[len(prompt):]
        scores = [s.cum_logprob for s in out.sequences]  # length_penalty 0: the plain sums
        assert scores == sorted(scores, reverse=True)


def test_rejects_bad_input(setup):
    _, llm, prompts = setup
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1"):
        BeamSearchParams(beam_width=0, max_tokens=3)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(ValueError, match="takes a list of prompts"):
        llm.beam_search("Hello", BeamSearchParams(beam_width=2, max_tokens=2))
    with pytest.raises(ValueError, match="LoRA"):
        llm.beam_search(prompts, BeamSearchParams(beam_width=2, max_tokens=2),
                        lora_request=object())
    # The engine still serves.
    assert llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)
