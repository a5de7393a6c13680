"""The per-step description of a flat batch that every attention layer reads.

Shape letters: T = tokens in the step, B = requests in the step,
P = max blocks per request, N = blocks in the pool, S = block_size,
Hkv = KV heads (of this rank), D = head size.

Paged KV cache layout (one tensor per layer)::

    kv_cache: [2, N, S, Hkv, D]      kv_cache[0] = keys, kv_cache[1] = values
    slot s  -> block s // S, offset s % S

A request ``b`` brings ``q_len[b] = query_start_loc[b+1] - query_start_loc[b]``
new tokens; after the step its context holds ``seq_lens[b]`` tokens, so its new
tokens sit at positions ``seq_lens[b] - q_len[b] .. seq_lens[b] - 1``::

    positions   0 .. ctx-1 (already cached)  | ctx .. seq_len-1 (this step)
    block table [b0, b1, b2, ...]            ->  token at position p lives in
                                                 block_tables[b, p // S], offset p % S

A prefill chunk and a decode differ only in q_len; one kernel serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AttentionMetadata:
    """Borrowed by every layer for one forward pass; built by the model runner."""

    num_tokens: int
    """T: tokens in the flat batch."""
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    """int32 [B+1] on the device: prefix sums of the requests' new-token counts."""
    seq_lens: torch.Tensor
    """int32 [B] on the device: context length of each request after this step."""
    block_tables: torch.Tensor
    """int32 [B, P] on the device: block ids of each request (padding past its end)."""
    slot_mapping: torch.Tensor
    """int64 [T] on the device: cache slot each new token's K/V is written to."""
    query_start_loc_cpu: list[int]
    """The same prefix sums as Python ints (the reference backend loops on them)."""
    seq_lens_cpu: list[int]
    decode_order: Optional[torch.Tensor] = None
    """int32 [B] on the device, decode-only steps on CUDA: the requests longest context
    first, the order the Triton kernel starts their programs in (results do not depend on
    it; ``longest_first``). None: batch order."""

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def longest_first(seq_lens: list[int]) -> list[int]:
    """Request indices by context length, longest first (ties in batch order): the launch
    order of a decode step's attention programs (``decode_order`` of
    ``kvflow.kernels.paged_attention.paged_attention``).

    Started in batch order, a batch of mixed lengths (T1: 100..1,280 keys) ends with a
    few long programs running alone: the kernel read ~78% of the copy bandwidth inside T1
    against 92-95% at uniform lengths. Longest first, the short ones fill that tail
    (list scheduling, within 4/3 of the best makespan).
    """
    return sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i])
