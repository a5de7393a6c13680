"""The attention layer: hands q/k/v and this layer's cache to the attention backend."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvflow.attention.backends.base import BaseAttentionBackend
from kvflow.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """Paged multi-head attention over flat tokens: q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""

    def __init__(self, backend: BaseAttentionBackend, num_heads: int, head_dim: int,
                 num_kv_heads: int, scale: float, sliding_window: Optional[int] = None,
                 alibi_slopes: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.backend = backend
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", alibi_slopes.float(), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = q.shape[0]
        out = self.backend.forward(
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            kv_cache,
            metadata,
            scale=self.scale,
            sliding_window=self.sliding_window,
            alibi_slopes=self.alibi_slopes,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
