"""Gated activation of the MLP: silu(gate) * up (Triton).

Shape letters: T = tokens, I = intermediate size. The reference is
``kvflow.kernels.ref.silu_and_mul``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.kernels import pdl


@triton.jit
def silu_times(gate, up, DTYPE: tl.constexpr):
    """silu(gate) * up in float32 from float32 operands, rounded to DTYPE after the silu
    and after the product (torch's ``F.silu(a) * b`` in half precision); shared with
    the AWQ GEMV that reads its input this way (``awq_gemv_rows``, GATED)."""
    act = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
    return (act * up).to(DTYPE).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(
    out_ptr, x_ptr, inter_size, stride_x, stride_o,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[t, i] = silu(x[t, i]) * x[t, I + i].

    Grid: ``(T, cdiv(I, BLOCK))``.

    Constexprs:
      BLOCK: columns per program (power of two); columns >= I are masked.
      USE_PDL: launched with ``kvflow.kernels.pdl.launch_options``.

    silu is computed in float32 and rounded to the input dtype before the product,
    which is rounded again: the two roundings of torch's ``F.silu(a) * b`` in half precision.
    """
    pdl.wait_for_predecessor(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter_size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter_size + cols, mask=mask, other=0.0).to(tl.float32)
    out = silu_times(gate, up, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I] (new tensor)."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [T, 2I], got {tuple(x.shape)}"
    assert x.stride(-1) == 1, "x's last dim must be contiguous"
    assert x.is_floating_point()
    num_tokens, inter_size = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter_size, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter_size == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter_size))
    options = pdl.launch_options(x.device)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter_size, block))](
        out, x, inter_size, x.stride(0), out.stride(0),
        BLOCK=block,
        USE_PDL=bool(options),
        num_warps=4 if block >= 512 else 1,
        **options,
    )
    return out
