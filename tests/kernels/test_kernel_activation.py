"""silu_and_mul against its reference."""

from __future__ import annotations

import pytest
import torch

from kvflow.kernels import ref
from kvflow.kernels.activation import silu_and_mul

ON_GPU = torch.cuda.is_available()
SHAPES = [(1, 1), (3, 7), (17, 64), (5, 1000), (2, 1500)] + ([(4096, 14336), (1, 28672)] if ON_GPU else [])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}  # one bf16 ulp


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_and_mul(device, shape, dtype):
    num_tokens, inter_size = shape
    x = (torch.randn(num_tokens, 2 * inter_size) * 3).to(dtype).to(device)
    out = silu_and_mul(x)
    assert out.shape == (num_tokens, inter_size) and out.dtype == dtype
    torch.testing.assert_close(out, ref.silu_and_mul(x), **TOL[dtype])


def test_strided_rows(device):
    """Rows may be a slice of a wider buffer; only the last dim must be contiguous."""
    buf = torch.randn(6, 40, device=device)
    x = buf[:, 4:36]
    torch.testing.assert_close(silu_and_mul(x), ref.silu_and_mul(x), atol=1e-5, rtol=1e-5)
