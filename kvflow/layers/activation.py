"""Gated activations of the MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.layers.fast_path import use_triton


class SiluAndMul(nn.Module):
    """[T, 2I] -> silu(x[:, :I]) * x[:, I:] (the fused gate_up output of Llama's MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x) and x.dim() == 2:
            from kvflow.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
