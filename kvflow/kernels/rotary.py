"""Rotary position embedding applied to q and k in place (Triton).

Shape letters: T = tokens, H = query heads, Hkv = KV heads, D = head size,
R = rotary_dim (<= D; partial rotary rotates only dims 0..R-1).

``cos_sin_cache[pos] = [cos(pos * f_0) .. cos(pos * f_{R/2-1}) | sin(...) ...]``.
Pair (x1, x2) of each head becomes (x1 cos - x2 sin, x2 cos + x1 sin)::

    NeoX  (is_neox=True):  x1 = dims 0 .. R/2-1,   x2 = dims R/2 .. R-1
    GPT-J (is_neox=False): x1 = dims 0, 2, 4, ..., x2 = dims 1, 3, 5, ...

Computed in float32, rounded once to q's dtype. The reference is
``kvflow.kernels.ref.apply_rotary``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, num_heads, stride_h, cos, sin, offs_1, offs_2, dim_mask,
    BLOCK_H: tl.constexpr,
):
    """Rotates heads 0 .. num_heads-1 of one token, BLOCK_H at a time."""
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & dim_mask[None, :]
        base = x_ptr + heads[:, None] * stride_h
        x1 = tl.load(base + offs_1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + offs_2[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(base + offs_1[None, :], o1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(base + offs_2[None, :], o2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Rotates every query and key head of one token.

    Grid: ``(T,)``; cos/sin of the token's position are loaded once for all heads.

    Constexprs:
      HALF:       R / 2, the number of rotated pairs per head.
      BLOCK_HALF: next power of two >= HALF; pairs >= HALF are masked.
      BLOCK_H:    heads per inner step (power of two); the program loops over head blocks.
      IS_NEOX:    pair layout (see the module docstring).
    """
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    offs = tl.arange(0, BLOCK_HALF)
    dim_mask = offs < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=dim_mask, other=0.0).to(tl.float32)
    if IS_NEOX:
        offs_1 = offs
        offs_2 = offs + HALF
    else:
        offs_1 = 2 * offs
        offs_2 = 2 * offs + 1
    _rotate_heads(q_ptr + token * stride_qt, num_heads, stride_qh, cos, sin, offs_1, offs_2,
                  dim_mask, BLOCK_H)
    _rotate_heads(k_ptr + token * stride_kt, num_kv_heads, stride_kh, cos, sin, offs_1, offs_2,
                  dim_mask, BLOCK_H)


def apply_rotary(
    q: torch.Tensor,  # [T, H, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D], rotated in place
    positions: torch.Tensor,  # int64 [T]
    cos_sin_cache: torch.Tensor,  # [max_pos, R]: cos | sin halves
    *,
    is_neox: bool,
    rotary_dim: Optional[int] = None,
) -> None:
    """Rotates q and k in place; they may be strided views (e.g. of one qkv output)."""
    assert q.dim() == 3 and k.dim() == 3, f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, D]"
    num_tokens, num_heads, head_size = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_size, (
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    assert cos_sin_cache.dim() == 2, f"cos_sin_cache must be [max_pos, R], got {tuple(cos_sin_cache.shape)}"
    if rotary_dim is None:
        rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim == cos_sin_cache.shape[1], (
        f"rotary_dim {rotary_dim} != cos_sin_cache width {cos_sin_cache.shape[1]}")
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_size, (
        f"rotary_dim {rotary_dim} must be even and in (0, head size {head_size}]")
    assert positions.dtype == torch.int64 and positions.shape == (num_tokens,), (
        f"positions must be int64 [{num_tokens}], got {positions.dtype} {tuple(positions.shape)}")
    assert positions.is_contiguous()
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1, (
        "the last dim of q, k and cos_sin_cache must be contiguous")
    assert q.dtype == k.dtype and q.is_floating_point() and cos_sin_cache.is_floating_point()
    assert q.device == k.device == positions.device == cos_sin_cache.device
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(num_heads, k.shape[1])), 2048 // block_half))
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        num_heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_H=block_h,
        IS_NEOX=is_neox,
        num_warps=4 if block_h * block_half >= 512 else 1,
    )
