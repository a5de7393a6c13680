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

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
