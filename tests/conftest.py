"""Shared fixtures: tiny checkpoints written once per session, and Triton on CPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton kernels run on CPU through its interpreter; the flag must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    tiny_models.write_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """checkpoint(family) -> folder of a tiny random model of that family (cached)."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    made: dict[str, str] = {}

    def make(family: str, **overrides) -> str:
        key = family + repr(sorted(overrides.items()))
        if key not in made:
            path = str(tmp_path_factory.mktemp(family))
            cfg = tiny_models.FAMILIES[family](vocab, **overrides)
            tiny_models.write_checkpoint(path, cfg, tokenizer_from=tokenizer_dir)
            made[key] = path
        return made[key]

    return make
