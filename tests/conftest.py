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

# Files whose tests are independent of each other (no module- or class-scoped fixture, no
# order): under pytest-xdist they spread over the workers one test at a time.
_SPREAD_FILES = {
    "tests/attention/test_torch_backend.py",
    "tests/kernels/test_gemv.py",
    "tests/kernels/test_kernel_activation.py",
    "tests/kernels/test_kernel_paged_attention.py",
    "tests/kernels/test_kernel_reshape_and_cache.py",
    "tests/kernels/test_kernel_rms_norm.py",
    "tests/kernels/test_kernel_rotary.py",
    "tests/kernels/test_kernel_triton_backend.py",
    "tests/quantization/test_awq_format.py",
    "tests/quantization/test_awq_int4pack.py",
    "tests/quantization/test_awq_kernels.py",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist with ``--dist loadgroup`` (benchmarks/gpu_tests.sh), every other
    test file runs whole, in its order, on one worker: its module-scoped engines and servers
    are built once, and a test that must run after the others of its file (the engine-core
    kill in tests/server/test_engine_core.py) still does. Without ``-n`` nothing changes."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers
        return
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path not in _SPREAD_FILES:
            item.add_marker(pytest.mark.xdist_group(path))


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
