"""RMSNorm and LayerNorm, with the residual add fused in (as decoder layers use them)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from kvflow.layers.fast_path import use_triton


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Without ``residual``: norm(x). With it: (norm(x + residual), x + residual)."""
        if use_triton(x) and x.dim() == 2:
            from kvflow.kernels.rms_norm import fused_add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class LayerNorm(nn.LayerNorm):
    """torch LayerNorm without grads; optional bias; same residual convention as RMSNorm."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, bias: bool = True) -> None:
        super().__init__(hidden_size, eps=eps, bias=bias, dtype=dtype)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, residual=None):  # type: ignore[override]
        if residual is None:
            return super().forward(x)
        x = x + residual
        return super().forward(x), x
