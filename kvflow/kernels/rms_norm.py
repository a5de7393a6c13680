"""RMSNorm and residual-add + RMSNorm (Triton), with HF LlamaRMSNorm rounding.

Shape letters: T = tokens, Hd = hidden size.

HF computes ``weight * (x_f32 * rsqrt(mean(x_f32**2) + eps)).to(x.dtype)``:
the normalised value is rounded to the input dtype *before* the weight
multiply. The kernels round at the same two places, so half-precision
outputs match HF's to the last bit up to rsqrt/summation-order rounding.
The references are ``kvflow.kernels.ref.rms_norm`` / ``fused_add_rms_norm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels import pdl


@triton.jit
def _rms_norm_kernel(
    out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr,
    hidden_size, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Normalises one row.

    Grid: ``(T,)``.

    Constexprs:
      HAS_RESIDUAL: first form ``x + residual`` (rounded to x's dtype, as torch adds
                    half-precision tensors), store it to residual_out, normalise it.
      BLOCK:        next power of two >= Hd; the whole row lives in registers.
      USE_PDL:      launched with ``kvflow.kernels.pdl.launch_options``.
    """
    pdl.wait_for_predecessor(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / hidden_size
    normed = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    assert x.dim() == 2, f"x must be [T, Hd], got {tuple(x.shape)}"
    num_tokens, hidden_size = x.shape
    assert weight.shape == (hidden_size,) and weight.is_contiguous(), (
        f"weight must be contiguous [{hidden_size}], got {tuple(weight.shape)}")
    assert x.stride(-1) == 1, "x's hidden dim must be contiguous"
    assert x.is_floating_point() and weight.is_floating_point()
    assert weight.device == x.device
    assert hidden_size <= 65536, f"hidden size {hidden_size} > 65536: one row no longer fits a program"
    # Output dtype follows torch's promotion of weight * x.to(x.dtype), as in HF.
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (
            f"residual {residual.dtype} {tuple(residual.shape)} must match x {x.dtype} {tuple(x.shape)}")
        assert residual.stride(-1) == 1 and residual.device == x.device
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        residual, residual_out = x, out  # unused
    if num_tokens == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden_size)
    options = pdl.launch_options(x.device)
    _rms_norm_kernel[(num_tokens,)](
        out, residual_out, x, residual, weight,
        hidden_size, eps,
        x.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=residual_out is not out,
        BLOCK=block,
        USE_PDL=bool(options),
        num_warps=min(16, max(1, block // 512)),
        **options,
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, Hd] -> [T, Hd]; x is read only."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) in new tensors; inputs are read only.

    One pass over memory instead of three (add, store, norm): the decoder layer's
    residual stream costs one read of each input and one write of each output.
    """
    return _launch(x, residual, weight, eps)
