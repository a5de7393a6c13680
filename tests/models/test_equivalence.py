"""Greedy token-for-token equality with transformers (float32, CPU) for every family.

Several prompts of different lengths run in one batch; the same holds when the
KV cache is so small that requests are preempted, when the token budget is so
small that prompts are chunked, and when prompts hit the prefix cache.
"""

from __future__ import annotations

import random

import pytest

import tiny_models
from kvflow import SamplingParams
from tiny_models import LLM32 as LLM

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 12


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 17, 40, 100]
    return [[1] + [rng.randrange(5, vocab) for _ in range(n - 1)] for n in lengths]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def references(checkpoint):
    cache: dict[str, tuple[str, list, list]] = {}

    def get(family: str):
        if family not in cache:
            path = checkpoint(family)
            llm_vocab = 420
            prompts = _prompts(llm_vocab)
            cache[family] = (path, prompts, tiny_models.hf_greedy(path, prompts, NEW_TOKENS))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, references):
    path, prompts, expected = references(family)
    llm = LLM(path, max_model_len=256)
    assert _greedy(llm, prompts) == expected
    # Run again: every prompt now hits the prefix cache and must give the same tokens.
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[-1].num_cached_tokens >= 96  # 100-token prompt: 6 full blocks cached
    llm.llm_engine.scheduler.check_integrity()


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_greedy_under_preemption_and_chunking(family, references):
    path, prompts, expected = references(family)
    # 8 blocks x 16 = 128 tokens for all five requests (they need ~200): preemption.
    llm = LLM(path, max_model_len=128, num_gpu_blocks_override=8, max_num_batched_tokens=16,
              block_size=16)
    assert _greedy(llm, prompts) == expected
    sched = llm.llm_engine.scheduler
    assert sched.num_preemptions > 0
    assert sched.kv_cache_manager.num_free_blocks == 8
    sched.check_integrity()


def test_chunked_prefill_without_prefix_caching(references):
    path, prompts, expected = references("llama")
    llm = LLM(path, max_model_len=256, max_num_batched_tokens=7, enable_prefix_caching=False,
              block_size=4)
    assert _greedy(llm, prompts) == expected


def test_sharded_safetensors_and_bin(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = tiny_models.llama_config(vocab)
    sharded = tiny_models.write_checkpoint(str(tmp_path / "sharded"), cfg,
                                           tokenizer_from=tokenizer_dir, max_shard_size="100KB")
    import os

    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    prompts = _prompts(vocab)[:3]
    expected = tiny_models.hf_greedy(sharded, prompts, NEW_TOKENS)
    assert _greedy(LLM(sharded, max_model_len=256), prompts) == expected
    # A .bin-only checkpoint (older hub repos): the same weights through torch.save.
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    binary = str(tmp_path / "bin")
    shutil.copytree(tiny_models.write_checkpoint(str(tmp_path / "single"), cfg,
                                                 tokenizer_from=tokenizer_dir), binary)
    torch.save(load_file(os.path.join(binary, "model.safetensors")),
               os.path.join(binary, "pytorch_model.bin"))
    os.remove(os.path.join(binary, "model.safetensors"))
    assert _greedy(LLM(binary, max_model_len=256), prompts) == expected
