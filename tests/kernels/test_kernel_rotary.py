"""apply_rotary against its reference: NeoX and GPT-J pairing, full and partial rotary."""

from __future__ import annotations

import pytest
import torch

from kvflow.kernels import ref
from kvflow.kernels.rotary import apply_rotary

ON_GPU = torch.cuda.is_available()
SHAPES = [  # (T, H, Hkv, D, R)
    (1, 1, 1, 16, 16),
    (5, 4, 2, 32, 32),
    (7, 6, 1, 64, 32),  # partial rotary, MQA
    (3, 4, 4, 80, 20),  # non-power-of-two head size and pair count
    (9, 2, 2, 128, 128),
] + ([(4096, 32, 8, 128, 128), (1000, 16, 2, 256, 64), (777, 12, 12, 64, 64)] if ON_GPU else [])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


def cos_sin_cache(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_pos, R]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_rotary(device, shape, is_neox, dtype):
    num_tokens, num_heads, num_kv_heads, head_size, rotary_dim = shape
    # q and k are strided views of one fused qkv output, as the model produces them.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_size).to(dtype).to(device)
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    cache = cos_sin_cache(4096, rotary_dim).to(device)
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, num_heads + num_kv_heads:].clone()
    ref.apply_rotary(q_ref, k_ref, positions, cache, is_neox=is_neox, rotary_dim=rotary_dim)
    apply_rotary(q, k, positions, cache, is_neox=is_neox, rotary_dim=rotary_dim)
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    assert torch.equal(qkv[:, num_heads + num_kv_heads:], v_before)  # v untouched
    assert torch.equal(q[..., rotary_dim:], q_ref[..., rotary_dim:])  # pass-through dims untouched


def test_matches_hf_llama_rotate_half(device):
    """NeoX style is HF Llama's q * cos + rotate_half(q) * sin."""
    q = torch.randn(6, 2, 32, device=device)
    k = torch.randn(6, 1, 32, device=device)
    positions = torch.arange(6, device=device) * 7
    cache = cos_sin_cache(64, 32).to(device)
    cos = torch.cat([cache[positions, :16]] * 2, -1)[:, None]
    sin = torch.cat([cache[positions, 16:]] * 2, -1)[:, None]

    def rotate_half(x):
        return torch.cat([-x[..., 16:], x[..., :16]], -1)

    expected_q, expected_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    apply_rotary(q, k, positions, cache, is_neox=True)
    torch.testing.assert_close(q, expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, expected_k, atol=1e-5, rtol=1e-5)


def test_bfloat16_cache(device):
    q = torch.randn(4, 2, 16, device=device)
    k = torch.randn(4, 2, 16, device=device)
    cache = cos_sin_cache(32, 16).to(torch.bfloat16).to(device)
    positions = torch.tensor([0, 3, 31, 9], device=device)
    q_ref, k_ref = q.clone(), k.clone()
    ref.apply_rotary(q_ref, k_ref, positions, cache, is_neox=False)
    apply_rotary(q, k, positions, cache, is_neox=False)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
