"""rms_norm and fused_add_rms_norm against their references (HF LlamaRMSNorm rounding)."""

from __future__ import annotations

import pytest
import torch

from kvflow.kernels import ref
from kvflow.kernels.rms_norm import fused_add_rms_norm, rms_norm

ON_GPU = torch.cuda.is_available()
SHAPES = [(1, 1), (3, 7), (17, 64), (4, 100), (2, 1000)] + ([(4096, 4096), (3, 8192), (7, 5120)] if ON_GPU else [])
# Half precision: the kernel and torch may round the normalised value to neighbouring
# representable numbers (rsqrt and summation order differ), so allow one ulp.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm(device, shape, dtype):
    x = torch.randn(shape).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(shape[1])).to(dtype).to(device)
    out = rms_norm(x, weight, 1e-6)
    expected = ref.rms_norm(x, weight, 1e-6)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_add_rms_norm(device, shape, dtype):
    x = torch.randn(shape).to(dtype).to(device)
    residual = torch.randn(shape).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(shape[1])).to(dtype).to(device)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_residual = ref.fused_add_rms_norm(x, residual, weight, 1e-5)
    if ON_GPU or dtype != torch.bfloat16:
        assert torch.equal(new_residual, expected_residual)  # one rounded add: exact
    else:  # Triton's CPU interpreter truncates float32 -> bfloat16 instead of rounding
        torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=2 ** -7)
    torch.testing.assert_close(out, expected_out, **TOL[dtype])
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_float32_weight_promotes_output(device):
    """HF: float32 weight * bf16 hidden -> float32 output."""
    x = torch.randn(5, 48).to(torch.bfloat16).to(device)
    weight = torch.rand(48, device=device) + 0.5
    out = rms_norm(x, weight, 1e-6)
    expected = ref.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32 == expected.dtype
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_strided_rows(device):
    buf = torch.randn(4, 80, device=device)
    x = buf[:, :64]
    weight = torch.rand(64, device=device)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6), atol=1e-5, rtol=1e-5)
