"""Prompts and helpers shared by the tensor-parallel tests."""

from __future__ import annotations

import random

import psutil

from kvflow import LLM, SamplingParams

VOCAB = 420
"""Size of the tests' tokenizer (tests/tiny_models.write_tokenizer)."""
NEW_TOKENS = 10


def prompts(seed: int = 0) -> list[list[int]]:
    """Prompts of 1, 3, 17 and 40 tokens (one, and several, KV blocks) for one batch."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(5, VOCAB) for _ in range(n - 1)] for n in (1, 3, 17, 40)]


def generate(llm: LLM, batch: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def greedy(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    return generate(llm, batch, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                               ignore_eos=True))


def is_running(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie awaiting its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
