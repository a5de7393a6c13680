"""Plain-torch attention over the paged cache: the CPU path and the oracle for kernels."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvflow.attention.backends.base import BaseAttentionBackend
from kvflow.attention.metadata import AttentionMetadata


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """kv_cache[:, slot] = (k, v) for each new token (in place)."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, Hkv, D] of one request, read through its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    keys = kv_cache[0, blocks].reshape(-1, *kv_cache.shape[3:])[:seq_len]
    values = kv_cache[1, blocks].reshape(-1, *kv_cache.shape[3:])[:seq_len]
    return keys, values


def attention_reference(
    q: torch.Tensor,  # [L, H, D]
    keys: torch.Tensor,  # [C, Hkv, D]
    values: torch.Tensor,  # [C, Hkv, D]
    *,
    scale: float,
    sliding_window: Optional[int] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of L queries that sit at the last L positions of a C-token context."""
    q_len, num_heads, _ = q.shape
    ctx_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)  # [C, H, D]
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float()) * scale  # [H, L, C]
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
    k_pos = torch.arange(ctx_len, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    if alibi_slopes is not None:
        rel = (k_pos - q_pos).float()  # [L, C]
        scores = scores + alibi_slopes.float()[:, None, None] * rel[None]
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, values.float())
    return out.to(q.dtype)


def padded_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    scale: float,
    sliding_window: Optional[int] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The same attention for the whole batch at once, padded to [B, max_q, ..., max_ctx].

    Why: a Python loop over requests costs a dozen small kernel calls per
    request and layer; padding turns a batch of decodes into a few batched calls.
    The product runs in torch's fused ``scaled_dot_product_attention`` (float32, the
    rule as a mask): on CPU 2.8x faster than the einsum/softmax chain at X1's decode
    and prefill shapes (benchmarks/RESULTS.md, fifth session). GQA without
    repeating keys: the G query heads of a KV head become G x max_q query rows.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    num_reqs = metadata.num_reqs
    max_q, max_ctx = metadata.max_query_len, metadata.max_seq_len
    num_blocks = -(-max_ctx // block_size)
    tables = metadata.block_tables[:, :num_blocks].long()  # [B, nb]
    keys = kv_cache[0][tables].reshape(num_reqs, num_blocks * block_size, num_kv_heads, head_dim)
    values = kv_cache[1][tables].reshape(num_reqs, num_blocks * block_size, num_kv_heads, head_dim)
    starts = metadata.query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]  # [B]
    seq_lens = metadata.seq_lens.long()
    # Scatter the flat queries into [B, max_q, H, D].
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs, device=q.device), q_lens)
    idx_in_req = torch.arange(num_tokens, device=q.device) - starts[req_of_token]
    q_pad = q.new_zeros(num_reqs, max_q, num_heads, head_dim)
    q_pad[req_of_token, idx_in_req] = q
    # [B, Hkv, G * Lq, D]: row g * Lq + i is query token i, head kv_head * G + g.
    q_rows = (q_pad.view(num_reqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
              .reshape(num_reqs, num_kv_heads, group * max_q, head_dim).float())
    ctx = num_blocks * block_size
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=q.device)[None]  # [B, Lq]
    k_pos = torch.arange(ctx, device=q.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Lq, C]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    mask = allowed[:, None, None].expand(num_reqs, 1, group, max_q, ctx)  # [B, 1, G, Lq, C]
    if alibi_slopes is not None:  # an additive mask: slope[h] * (k - p), -inf where not allowed
        rel = (k_pos[None, None, :] - q_pos[:, :, None]).float()  # [B, Lq, C]
        slopes = alibi_slopes.float().view(1, num_kv_heads, group, 1, 1)
        mask = (slopes * rel[:, None, None]).masked_fill(~mask, float("-inf"))  # [B, Hkv, G, Lq, C]
    mask = mask.reshape(num_reqs, mask.shape[1], group * max_q, ctx)
    # Padded query rows allow no key (their output is never read). On a GPU this backend
    # is the kernels' oracle: keep SDPA to its plain float32 math there (the fused
    # float32 kernels may round through TF32).
    with contextlib.nullcontext() if q.device.type == "cpu" else sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q_rows, keys.transpose(1, 2).float(),
                                             values.transpose(1, 2).float(), attn_mask=mask,
                                             scale=scale)  # [B, Hkv, G * Lq, D]
    out = (out.view(num_reqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
           .reshape(num_reqs, max_q, num_heads, head_dim))
    return out[req_of_token, idx_in_req].to(q.dtype)


# Above this many score elements the padded path would waste too much memory: loop instead.
_PADDED_LIMIT = 1 << 26


class TorchAttentionBackend(BaseAttentionBackend):
    """Plain torch: the whole batch padded at once when small, else a loop over requests."""

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, *, scale,
                sliding_window=None, alibi_slopes=None, rotary=None):
        assert rotary is None, "the torch backend does not fuse rotary: rotate q and k first"
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping)
        padded_size = metadata.num_reqs * q.shape[1] * metadata.max_query_len * metadata.max_seq_len
        if padded_size <= _PADDED_LIMIT:
            return padded_attention(q, kv_cache, metadata, scale=scale,
                                    sliding_window=sliding_window, alibi_slopes=alibi_slopes)
        out = torch.empty_like(q)
        starts = metadata.query_start_loc_cpu
        for b, seq_len in enumerate(metadata.seq_lens_cpu):
            lo, hi = starts[b], starts[b + 1]
            if hi == lo:
                continue
            keys, values = gather_context(kv_cache, metadata.block_tables[b], seq_len)
            out[lo:hi] = attention_reference(
                q[lo:hi], keys, values, scale=scale,
                sliding_window=sliding_window, alibi_slopes=alibi_slopes,
            )
        return out
