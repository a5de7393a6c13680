"""write_kv_cache against its reference: exact, including skipped padding slots."""

from __future__ import annotations

import pytest
import torch

from kvflow.kernels import ref
from kvflow.kernels.reshape_and_cache import write_kv_cache

ON_GPU = torch.cuda.is_available()
SHAPES = [  # (T, Hkv, D, N, S)
    (1, 1, 16, 1, 16),
    (7, 2, 32, 3, 16),
    (33, 3, 20, 5, 8),  # non-power-of-two heads and head size
    (16, 8, 128, 2, 16),  # exactly fills the pool
    (5, 1, 64, 6, 1),
] + ([(4099, 8, 128, 300, 16), (1000, 4, 256, 100, 32), (513, 32, 128, 64, 16)] if ON_GPU else [])


def _run(k, v, kv_cache, slots):
    expected = kv_cache.clone()
    ref.write_kv_cache(k, v, expected, slots)
    write_kv_cache(k, v, kv_cache, slots)
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_cache(device, shape, dtype):
    num_tokens, num_kv_heads, head_size, num_blocks, block_size = shape
    gen = torch.Generator().manual_seed(num_tokens)
    # k and v are strided views into one fused qkv output, as the model produces them.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_size, generator=gen).to(dtype).to(device)
    k, v = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=gen)
    kv_cache = kv_cache.to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    _run(k, v, kv_cache, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_slots_are_skipped(device, dtype):
    k = torch.randn(6, 2, 16).to(dtype).to(device)
    v = torch.randn(6, 2, 16).to(dtype).to(device)
    kv_cache = torch.randn(2, 2, 4, 2, 16).to(dtype).to(device)
    slots = torch.tensor([5, -1, 0, -1, 7, -1], device=device)
    before = kv_cache.clone()
    _run(k, v, kv_cache, slots)
    untouched = torch.ones(8, dtype=torch.bool)
    untouched[[5, 0, 7]] = False
    flat, flat_before = kv_cache.view(2, 8, 2, 16), before.view(2, 8, 2, 16)
    assert torch.equal(flat[:, untouched.to(device)], flat_before[:, untouched.to(device)])


def test_casts_to_cache_dtype(device):
    """float32 activations into a bfloat16 cache round as torch's .to() does (nearest even).

    Triton's CPU interpreter truncates float32 -> bfloat16 instead, so there one ulp is allowed.
    """
    k = torch.randn(9, 2, 32, device=device)
    v = torch.randn(9, 2, 32, device=device)
    kv_cache = torch.zeros(2, 3, 4, 2, 32, dtype=torch.bfloat16, device=device)
    slots = torch.randperm(12, device=device)[:9]
    if ON_GPU:
        _run(k, v, kv_cache, slots)
    else:
        expected = kv_cache.clone()
        ref.write_kv_cache(k, v, expected, slots)
        write_kv_cache(k, v, kv_cache, slots)
        torch.testing.assert_close(kv_cache, expected, atol=0, rtol=2 ** -7)


def test_empty_batch(device):
    kv_cache = torch.zeros(2, 1, 4, 1, 16, device=device)
    write_kv_cache(torch.zeros(0, 1, 16, device=device), torch.zeros(0, 1, 16, device=device),
                   kv_cache, torch.zeros(0, dtype=torch.int64, device=device))
    assert not kv_cache.any()
