"""Plain-torch twins of the Triton kernels: same signatures, slow, obvious, no tricks.

Shape letters: T = tokens, B = requests, H = query heads, Hkv = KV heads,
D = head size, N = cache blocks, S = block size, P = max blocks per request.
Each kernel test diffs ``kvflow.kernels.<op>`` against the function of the same
name here. Attention reuses the torch backend's functions, so the kernels,
this module and ``TorchAttentionBackend`` share one definition of the semantics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kvflow.attention.backends import torch_ref


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, N, S, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # int64 [T]; < 0 = padding, skipped
) -> None:
    """kv_cache[:, slot] = (k, v) for every token whose slot is >= 0."""
    keep = slot_mapping >= 0
    torch_ref.write_kv_cache(k[keep], v[keep], kv_cache, slot_mapping[keep])


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, N, S, Hkv, D]
    query_start_loc: torch.Tensor,  # int32 [B+1]
    seq_lens: torch.Tensor,  # int32 [B]
    block_tables: torch.Tensor,  # int32 [B, P]
    *,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: Optional[int] = None,
    alibi_slopes: Optional[torch.Tensor] = None,  # float32 [H]
) -> torch.Tensor:  # [T, H, D]
    """Loops over requests: gather the context through the block table, attend causally."""
    del max_query_len, max_seq_len  # tiling hints for the kernel only
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        keys, values = torch_ref.gather_context(kv_cache, block_tables[b], seq_len)
        out[lo:hi] = torch_ref.attention_reference(
            q[lo:hi], keys, values, scale=scale,
            sliding_window=sliding_window, alibi_slopes=alibi_slopes,
        )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in float32, cast back to x's dtype, then times weight."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    hidden = x.float() * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype first, as in HF."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def apply_rotary(
    q: torch.Tensor,  # [T, H, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D], rotated in place
    positions: torch.Tensor,  # int64 [T]
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim]: cos | sin halves
    *,
    is_neox: bool,
    rotary_dim: Optional[int] = None,
) -> None:
    """Rotates the first rotary_dim dims of every head, in float32, in place.

    NeoX pairs dim i with i + rotary_dim/2 (rotate halves); GPT-J pairs 2i with 2i+1.
    """
    rotary_dim = cos_sin_cache.shape[1] if rotary_dim is None else rotary_dim
    assert rotary_dim == cos_sin_cache.shape[1] and rotary_dim % 2 == 0
    half = rotary_dim // 2
    cos_sin = cos_sin_cache[positions].float()  # [T, rotary_dim]
    cos = cos_sin[:, None, :half]  # [T, 1, half]
    sin = cos_sin[:, None, half:rotary_dim]
    for x in (q, k):
        rot = x[..., :rotary_dim].float()
        if is_neox:
            x1, x2 = rot[..., :half], rot[..., half:]
            rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        x[..., :rotary_dim] = rotated.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [T, 2I], in x's dtype like HF's MLP."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
         ) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) in float32, rounded once to x's dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
