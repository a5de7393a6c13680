"""The attention layer: hands q/k/v and this layer's cache to the attention backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from kvflow.attention.backends.base import BaseAttentionBackend, RotaryInput
from kvflow.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from kvflow.layers.rotary import RotaryEmbedding


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
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                rotary: Optional[tuple[RotaryEmbedding, torch.Tensor]] = None) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] (strided views of a qkv output are fine) -> [T, H*D].

        ``rotary`` = (the layer's rotary embedding, positions [T]): applied to q and k
        here, or inside the backend's KV write where it fuses them (Triton: one launch
        less a layer). q may be rotated in place either way.
        """
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        fused = None
        if rotary is not None:
            embedding, positions = rotary
            if self.backend.fuses_rotary:
                fused = RotaryInput(positions, embedding.cos_sin_cache, embedding.is_neox_style)
            else:
                q, k = embedding(positions, q, k)
        out = self.backend.forward(
            q, k,
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            kv_cache,
            metadata,
            scale=self.scale,
            sliding_window=self.sliding_window,
            alibi_slopes=self.alibi_slopes,
            rotary=fused,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
