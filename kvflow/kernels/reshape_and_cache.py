"""Write the step's new keys and values into the paged KV cache (Triton).

Shape letters: T = tokens in the step, Hkv = KV heads, D = head size,
N = blocks in the pool, S = block size (see ``kvflow.attention.metadata``).

    slot_mapping[t] = s  ->  kv_cache[0, s // S, s % S] = k[t]
                             kv_cache[1, s // S, s % S] = v[t]
    slot_mapping[t] < 0  ->  token t is padding (CUDA-graph batch padding): skipped

The reference is ``kvflow.kernels.ref.write_kv_cache``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cn, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Copies one token's K and V rows for ``BLOCK_H`` KV heads into its cache slot.

    Grid: ``(T, cdiv(Hkv, BLOCK_H))``; program (t, j) copies heads
    ``j * BLOCK_H .. j * BLOCK_H + BLOCK_H - 1`` of token t.

    Constexprs:
      BLOCK_SIZE: cache block size S (slot -> block, offset).
      HEAD_SIZE:  D.
      BLOCK_D:    next power of two >= D; dims >= D are masked.
      BLOCK_H:    heads per program, a power of two; heads >= Hkv are masked.
    """
    t = tl.program_id(0)
    head_block = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + t)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_SIZE)[None, :]
    # int64 on the cache side: a layer's cache can hold more than 2**31 elements.
    cache_off = (block.to(tl.int64) * stride_cn + offset * stride_cs
                 + heads[:, None].to(tl.int64) * stride_ch + dims[None, :])
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :],
                mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                mask=mask)
    tl.store(k_cache_ptr + cache_off, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_off, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, N, S, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # int64 [T]; < 0 = padding, skipped
) -> None:
    """Stores k/v of every token at its slot; k/v may be strided views (e.g. of a qkv output)."""
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
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert k_cache.stride() == v_cache.stride()
    # One program per token moves all its heads when they fit in 2k elements:
    # few, fat programs keep the copy at memory speed for small D.
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=kv_cache.shape[2],
        HEAD_SIZE=head_size,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )
