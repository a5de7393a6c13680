"""The attention-backend interface: write new K/V into the paged cache, attend over it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch

from kvflow.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class RotaryInput:
    """A layer's rotary embedding handed to a backend that applies it inside its KV write
    (``fuses_rotary``): ``kvflow.kernels.rotary.apply_rotary``'s arguments."""

    positions: torch.Tensor
    """int64 [T]: each token's position."""
    cos_sin_cache: torch.Tensor
    """[max_pos, R]: cos | sin halves of each position (R = rotary dims, even, <= D)."""
    is_neox: bool
    """NeoX pairs dim i with i + R/2; GPT-J pairs 2i with 2i + 1."""


class BaseAttentionBackend(ABC):
    """Paged attention for a flat batch of prefill chunks and decodes.

    Semantics every backend must match (the torch reference is the oracle):
    a query at position p of request b attends to the keys at positions
    k <= p of the same request (causal); with ``sliding_window`` = W only to
    k > p - W; with ``alibi_slopes`` the score of head h gets
    ``slope[h] * (k - p)`` added before the softmax. Query head h reads KV head
    ``h // (H // Hkv)`` (GQA/MQA). ``scale`` multiplies q·k.
    """

    fuses_rotary: bool = False
    """Whether ``forward`` takes ``rotary`` (else the caller rotates q and k first)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, N, S, Hkv, D], written in place
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: Optional[int] = None,
        alibi_slopes: Optional[torch.Tensor] = None,  # float32 [H]
        rotary: Optional[RotaryInput] = None,
    ) -> torch.Tensor:  # [T, H, D]
        """Stores k/v at ``metadata.slot_mapping`` then returns the attention output;
        with ``rotary`` (``fuses_rotary`` backends only) q and k are rotated first."""


def create_attention_backend(name: str) -> BaseAttentionBackend:
    """Returns the backend called ``name`` ("torch" or "triton")."""
    if name == "torch":
        from kvflow.attention.backends.torch_ref import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from kvflow.attention.backends.triton import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"Unknown attention backend {name!r}; choose 'torch' or 'triton'.")
