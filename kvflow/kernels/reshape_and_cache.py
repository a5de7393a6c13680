"""Write the step's new keys and values into the paged KV cache (Triton).

Shape letters: T = tokens in the step, Hkv = KV heads, D = head size,
N = blocks in the pool, S = block size (see ``kvflow.attention.metadata``).

    slot_mapping[t] = s  ->  kv_cache[0, s // S, s % S] = k[t]
                             kv_cache[1, s // S, s % S] = v[t]
    slot_mapping[t] < 0  ->  token t is padding (CUDA-graph batch padding): skipped

With ``rotary`` the same launch first applies the rotary embedding: q in place, k on
its way into the cache (k itself is left as it came). At batch 1 a layer's kernels
are a few microseconds each and mostly latency, so two launches made one save ~2.5 µs
a layer. The rotation is ``kvflow.kernels.rotary``'s, written per dim: dim d < R
pairs with ``partner(d)`` and reads cos/sin of pair ``j(d)``::

    NeoX:   d < R/2: out = x[d] cos_j - x[d + R/2] sin_j        j = d mod R/2
            else:    out = x[d] cos_j + x[d - R/2] sin_j
    GPT-J:  d even:  out = x[d] cos_j - x[d + 1] sin_j          j = d // 2
            d odd:   out = x[d] cos_j + x[d - 1] sin_j
    d >= R (partial rotary): out = x[d]

The references are ``kvflow.kernels.ref.write_kv_cache`` and ``ref.apply_rotary``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.attention.backends.base import RotaryInput
from kvflow.kernels import pdl


@triton.jit
def _rotate_rows(x_ptrs, partner_ptrs, mask, cos, sin, sign):
    """Rows of heads at x_ptrs, rotated (float32, see the module doc): x cos + sign x' sin."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(partner_ptrs, mask=mask, other=0.0).to(tl.float32)
    return x * cos[None, :] + sign[None, :] * partner * sin[None, :]


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_ptr, positions_ptr, cos_sin_ptr,
    num_kv_heads, num_heads, rotary_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cn, stride_cs, stride_ch,
    stride_qt, stride_qh, stride_rs,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    IS_NEOX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Copies one token's K and V rows for ``BLOCK_H`` KV heads into its cache slot.

    Grid: ``(T, cdiv(Hkv, BLOCK_H))``; program (t, j) copies heads
    ``j * BLOCK_H .. j * BLOCK_H + BLOCK_H - 1`` of token t. With HAS_ROTARY it rotates
    those keys on the way, and program (t, 0) also rotates all of token t's query heads
    in place (``BLOCK_HQ`` at a time), padding tokens included (their output is unread).

    Constexprs:
      BLOCK_SIZE: cache block size S (slot -> block, offset).
      HEAD_SIZE:  D.
      BLOCK_D:    next power of two >= D; dims >= D are masked.
      BLOCK_H:    heads per program, a power of two; heads >= Hkv are masked.
      BLOCK_HQ:   query heads per rotation step, a power of two.
      HAS_ROTARY: rotate (``rotary_dim`` = R of the cos/sin cache, even, <= D).
      IS_NEOX:    the pairing (module doc).
      USE_PDL:    launched with ``kvflow.kernels.pdl.launch_options``.
    """
    pdl.wait_for_predecessor(USE_PDL)
    t = tl.program_id(0)
    head_block = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_SIZE
    if HAS_ROTARY:
        half = rotary_dim // 2
        rotated = dims < rotary_dim
        if IS_NEOX:
            first = dims < half
            pair = tl.where(first, dims, dims - half)
            partner = tl.where(first, dims + half, dims - half)
        else:
            first = dims % 2 == 0
            pair = dims // 2
            partner = tl.where(first, dims + 1, dims - 1)
        partner = tl.where(rotated, partner, dims)
        pos = tl.load(positions_ptr + t)
        cos_sin = cos_sin_ptr + pos * stride_rs
        cos = tl.load(cos_sin + pair, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(cos_sin + half + pair, mask=rotated, other=0.0).to(tl.float32)
        sign = tl.where(first, -1.0, 1.0)
        if head_block == 0:
            q_row = q_ptr + t.to(tl.int64) * stride_qt
            for h0 in range(0, num_heads, BLOCK_HQ):
                q_heads = h0 + tl.arange(0, BLOCK_HQ)
                q_mask = (q_heads < num_heads)[:, None] & dim_mask[None, :]
                q_ptrs = q_row + q_heads[:, None] * stride_qh
                out = _rotate_rows(q_ptrs + dims[None, :], q_ptrs + partner[None, :], q_mask,
                                   cos, sin, sign)
                tl.store(q_ptrs + dims[None, :], out.to(q_ptr.dtype.element_ty), mask=q_mask)
    slot = tl.load(slot_mapping_ptr + t)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (heads < num_kv_heads)[:, None] & dim_mask[None, :]
    # int64 on the cache side: a layer's cache can hold more than 2**31 elements.
    cache_off = (block.to(tl.int64) * stride_cn + offset * stride_cs
                 + heads[:, None].to(tl.int64) * stride_ch + dims[None, :])
    k_rows = k_ptr + t.to(tl.int64) * stride_kt + heads[:, None] * stride_kh
    if HAS_ROTARY:
        k = _rotate_rows(k_rows + dims[None, :], k_rows + partner[None, :], mask, cos, sin, sign)
    else:
        k = tl.load(k_rows + dims[None, :], mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                mask=mask)
    tl.store(k_cache_ptr + cache_off, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_off, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, N, S, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # int64 [T]; < 0 = padding, skipped
    *,
    q: Optional[torch.Tensor] = None,  # [T, H, D], rotated in place with ``rotary``
    rotary: Optional[RotaryInput] = None,
) -> None:
    """Stores k/v of every token at its slot; k/v may be strided views (e.g. of a qkv output).

    With ``rotary``: first rotates q in place and k as it is stored (module doc), as
    ``apply_rotary`` followed by the plain write would, in one launch.
    """
    assert k.dim() == 3 and v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [T, Hkv, D]"
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, (
        f"kv_cache must be [2, N, S, Hkv, D], got {tuple(kv_cache.shape)}")
    num_tokens, num_kv_heads, head_size = k.shape
    assert kv_cache.shape[3:] == (num_kv_heads, head_size), (
        f"kv_cache heads/dim {tuple(kv_cache.shape[3:])} != k's {(num_kv_heads, head_size)}")
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (num_tokens,), (
        f"slot_mapping must be int64 [{num_tokens}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    assert slot_mapping.is_contiguous()
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1, (
        "the head dim of k, v and kv_cache must be contiguous")
    assert k.device == v.device == kv_cache.device == slot_mapping.device
    assert kv_cache.is_floating_point() and k.is_floating_point()
    if rotary is not None:
        assert q is not None and q.dim() == 3 and q.shape[0] == num_tokens and q.shape[2] == head_size, (
            f"rotary needs q [T, H, D] beside k {tuple(k.shape)}, got "
            f"{None if q is None else tuple(q.shape)}")
        assert q.stride(-1) == 1 and q.dtype == k.dtype and q.device == k.device
        cache = rotary.cos_sin_cache
        rotary_dim = cache.shape[1]
        assert cache.dim() == 2 and cache.stride(-1) == 1 and cache.device == k.device
        assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_size, (
            f"rotary_dim {rotary_dim} must be even and in (0, head size {head_size}]")
        assert rotary.positions.dtype == torch.int64 and rotary.positions.shape == (num_tokens,), (
            f"positions must be int64 [{num_tokens}], got {rotary.positions.dtype} "
            f"{tuple(rotary.positions.shape)}")
        assert rotary.positions.is_contiguous() and rotary.positions.device == k.device
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert k_cache.stride() == v_cache.stride()
    # One program per token moves all its heads when they fit in 2k elements:
    # few, fat programs keep the copy at memory speed for small D.
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    num_heads = q.shape[1] if rotary is not None else 0
    block_hq = min(triton.next_power_of_2(max(1, num_heads)), max(1, 2048 // block_d))
    options = pdl.launch_options(k.device)
    _write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        q if rotary is not None else k,
        rotary.positions if rotary is not None else slot_mapping,
        rotary.cos_sin_cache if rotary is not None else k,
        num_kv_heads, num_heads, rotary.cos_sin_cache.shape[1] if rotary is not None else 0,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        q.stride(0) if rotary is not None else 0, q.stride(1) if rotary is not None else 0,
        rotary.cos_sin_cache.stride(0) if rotary is not None else 0,
        BLOCK_SIZE=kv_cache.shape[2],
        HEAD_SIZE=head_size,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        BLOCK_HQ=block_hq,
        HAS_ROTARY=rotary is not None,
        IS_NEOX=rotary.is_neox if rotary is not None else True,
        USE_PDL=bool(options),
        num_warps=4 if max(block_h, block_hq if rotary is not None else 0) * block_d >= 1024 else 1,
        **options,
    )
