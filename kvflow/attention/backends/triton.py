"""Paged attention on the GPU through the Triton kernels of ``kvflow.kernels``."""

from __future__ import annotations

from typing import Optional

import torch

from kvflow.attention.backends.base import BaseAttentionBackend, RotaryInput
from kvflow.attention.metadata import AttentionMetadata
from kvflow.kernels.paged_attention import paged_attention
from kvflow.kernels.reshape_and_cache import write_kv_cache


class TritonAttentionBackend(BaseAttentionBackend):
    """Two launches a layer: store the new K/V (rotating q and k on the way when the layer
    hands over its rotary embedding), then one attention kernel for the whole batch.

    ``num_kv_splits`` pins the split-KV factor of decode steps (None: chosen from the
    batch's shape each step). Pin it when decode steps are captured in CUDA graphs,
    so a replay does not inherit the choice made for the capture batch's lengths.
    Unlike the torch backend, slots < 0 in ``slot_mapping`` (batch padding) are skipped.
    """

    fuses_rotary = True

    def __init__(self, num_kv_splits: Optional[int] = None):
        if num_kv_splits is not None and num_kv_splits < 1:
            raise ValueError(f"num_kv_splits={num_kv_splits} must be >= 1 (or None for automatic).")
        self.num_kv_splits = num_kv_splits

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, *, scale,
                sliding_window=None, alibi_slopes=None,
                rotary: Optional[RotaryInput] = None) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping, q=q, rotary=rotary)
        return paged_attention(
            q, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_tables,
            scale=scale,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
            sliding_window=sliding_window,
            alibi_slopes=alibi_slopes,
            num_kv_splits=self.num_kv_splits,
            decode_order=metadata.decode_order,
        )
