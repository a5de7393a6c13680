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


ROTARY_SHAPES = [  # (T, H, Hkv, D, R)
    (1, 4, 1, 16, 16),
    (5, 4, 2, 32, 32),
    (7, 6, 3, 64, 32),  # partial rotary, non-power-of-two head counts
    (3, 4, 4, 80, 20),  # non-power-of-two head size and pair count
] + ([(513, 32, 8, 128, 128), (64, 16, 2, 256, 64)] if ON_GPU else [])
ROTARY_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
              torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_with_rotary(device, shape, is_neox, dtype):
    """One launch = apply_rotary (q in place, k) then the plain write; k itself untouched."""
    from kvflow.attention.backends.base import RotaryInput
    from tests.kernels.test_kernel_rotary import cos_sin_cache

    num_tokens, num_heads, num_kv_heads, head_size, rotary_dim = shape
    gen = torch.Generator().manual_seed(num_tokens + head_size)
    # q, k and v are strided views into one fused qkv output, as the model produces them.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_size, generator=gen)
    qkv = qkv.to(dtype).to(device)
    q = qkv[:, :num_heads]
    k = qkv[:, num_heads:num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads:]
    block_size = 16
    num_blocks = -(-num_tokens // block_size) + 1
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=gen)
    kv_cache = kv_cache.to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding tokens: no write (their q is still rotated)
    slots = slots.to(device)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    cache = cos_sin_cache(4096, rotary_dim).to(device)

    q_ref, k_ref = q.clone(), k.clone()
    ref.apply_rotary(q_ref, k_ref, positions, cache, is_neox=is_neox, rotary_dim=rotary_dim)
    expected = kv_cache.clone()
    ref.write_kv_cache(k_ref, v, expected, slots)
    k_before, v_before = k.clone(), v.clone()

    write_kv_cache(k, v, kv_cache, slots, q=q,
                   rotary=RotaryInput(positions, cache, is_neox))
    torch.testing.assert_close(q, q_ref, **ROTARY_TOL[dtype])
    torch.testing.assert_close(kv_cache, expected, **ROTARY_TOL[dtype])
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
    assert torch.equal(q[..., rotary_dim:], q_ref[..., rotary_dim:])  # pass-through dims exact
    written = slots >= 0
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)
    assert torch.equal(flat[1, slots[written]], v[written])  # values copied exactly
