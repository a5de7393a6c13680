"""Rotary position embeddings, with the Llama-3 and linear frequency scalings.

The cos/sin table is computed once for every position up to the model's
maximum, in float32, exactly as transformers computes it (same inverse
frequencies, same products), so float32 outputs match token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kvflow.layers.fast_path import use_triton


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of a checkpoint (config's ``rope_scaling``/``rope_parameters``)."""

    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @staticmethod
    def from_dict(d: Optional[dict]) -> "RopeScaling":
        if not d:
            return RopeScaling()
        rope_type = d.get("rope_type") or d.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                             "supported: default, linear, llama3.")
        return RopeScaling(
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


def inverse_frequencies(rotary_dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the middle blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q [T, H, D] and k [T, Hkv, D] at ``positions`` [T]."""

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool = True, scaling: RopeScaling = RopeScaling()) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        inv_freq = inverse_frequencies(rotary_dim, base, scaling)
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [P, rot/2]
        # [P, rot]: first half cos, second half sin (the layout the Triton kernel reads).
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1),
                             persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = x[..., : self.rotary_dim]
        if self.is_neox_style:
            cos = torch.cat([cos, cos], dim=-1)[:, None, :].to(x.dtype)
            sin = torch.cat([sin, sin], dim=-1)[:, None, :].to(x.dtype)
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat([-x2, x1], dim=-1)
            out = rot * cos + rotated * sin
        else:
            cos = cos.repeat_interleave(2, dim=-1)[:, None, :].to(x.dtype)
            sin = sin.repeat_interleave(2, dim=-1)[:, None, :].to(x.dtype)
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
            out = rot * cos + rotated * sin
        if self.rotary_dim == self.head_dim:
            return out
        return torch.cat([out, x[..., self.rotary_dim:]], dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns rotated (q, k); on CUDA they are rotated in place by the Triton kernel."""
        if use_triton(q):
            from kvflow.kernels.rotary import apply_rotary

            apply_rotary(q, k, positions, self.cos_sin_cache, is_neox=self.is_neox_style,
                         rotary_dim=self.rotary_dim)
            return q, k
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
