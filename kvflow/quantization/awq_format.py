"""AutoAWQ's GEMM checkpoint layout, and the plain-torch reference of the AWQ kernels.

Shape letters: M = tokens, K = input features, N = output features, G = group
size (K when the checkpoint says ``group_size=-1``: one group per column).

One linear layer ``y = x @ W.T`` (nn.Linear's W is [N, K]) is stored as::

    qweight  int32   [K, N/8]      4-bit codes q, eight per int32, along N
    qzeros   int32   [K/G, N/8]    4-bit zero points z, packed like qweight
    scales   float16 [K/G, N]
    W[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]

Inside one int32 of packed column c, the nibble at bits 4i..4i+3 holds output
column 8c + AWQ_ORDER[i]::

    nibble i:  7      6      5      4      3      2      1      0
    bits:      31..28 27..24 23..20 19..16 15..12 11..8  7..4   3..0
    column:    8c+7   8c+5   8c+3   8c+1   8c+6   8c+4   8c+2   8c+0

Even columns sit in the low half-word and odd ones in the high half, so
AutoAWQ's CUDA kernel turns one int32 into four half2 pairs with a few bit
operations. Column 8c + j therefore lives at nibble ``AWQ_REVERSE_ORDER[j]``
= j // 2 + 4 * (j % 2); the Triton kernels compute that shift in closed form.

Everything here is exact: codes and zeros are small integers and a float16
scale times an integer of at most 4 bits fits float32's mantissa, so
``dequantize(..., torch.float32)`` reproduces the weights a checkpoint means
bit for bit. That is what the CPU path runs and what the kernels are diffed
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_FACTOR = 8
"""4-bit values per int32."""
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of a packed int32 holds column AWQ_ORDER[i] of its group of eight."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Column j of a group of eight lives at nibble AWQ_REVERSE_ORDER[j]."""

_MAX_CODE = 15


def _shifts(device: torch.device) -> torch.Tensor:
    """Bit offset of column j (j = 0..7) inside its int32: int32 [8]."""
    return torch.tensor([4 * i for i in AWQ_REVERSE_ORDER], dtype=torch.int32, device=device)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[R, N] integers in 0..15 -> int32 [R, N/8] in AutoAWQ's nibble order."""
    if codes.dim() != 2 or codes.shape[1] % PACK_FACTOR:
        raise ValueError(f"pack needs [R, N] codes with N a multiple of {PACK_FACTOR}, "
                         f"got shape {tuple(codes.shape)}.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > _MAX_CODE):
        raise ValueError(f"pack needs 4-bit codes in 0..{_MAX_CODE}, got values in "
                         f"{int(codes.min())}..{int(codes.max())}.")
    rows, cols = codes.shape
    grouped = codes.to(torch.int64).reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)  # [R, N/8, 8]
    # Work in int64 so the top nibble never touches a sign bit, then wrap to int32.
    packed = torch.zeros(rows, cols // PACK_FACTOR, dtype=torch.int64, device=codes.device)
    for j, nibble in enumerate(AWQ_REVERSE_ORDER):
        packed |= grouped[:, :, j] << (4 * nibble)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> int32 [R, N] codes in 0..15 (the inverse of ``pack``)."""
    assert packed.dtype == torch.int32 and packed.dim() == 2, (
        f"unpack needs int32 [R, N/8], got {packed.dtype} {tuple(packed.shape)}")
    rows, packed_cols = packed.shape
    # The arithmetic shift smears the sign bit into the high bits; the mask drops it.
    codes = (packed.unsqueeze(-1) >> _shifts(packed.device)) & _MAX_CODE  # [R, N/8, 8]
    return codes.reshape(rows, packed_cols * PACK_FACTOR)


def quantize(weight: torch.Tensor, group_size: int | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit quantization of an nn.Linear weight [N, K].

    Returns ``(qweight, qzeros, scales)`` in AutoAWQ's GEMM layout; ``group_size``
    None means one group over all of K. No activation-aware scaling search: the
    result is a valid AWQ checkpoint for tests and benchmarks, not a good one.
    Scales are rounded to float16 *before* the codes are chosen, so
    ``dequantize`` gives back exactly the weights the codes were fit to.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize needs a [N, K] weight, got shape {tuple(weight.shape)}.")
    num_out, num_in = weight.shape
    group = num_in if group_size is None else group_size
    if num_in % group or num_out % PACK_FACTOR:
        raise ValueError(f"weight [{num_out}, {num_in}] does not fit group_size={group_size}: "
                         f"K must be a multiple of the group size and N of {PACK_FACTOR}.")
    num_groups = num_in // group
    w = weight.detach().to(torch.float32).reshape(num_out, num_groups, group)  # [N, K/G, G]
    w_max, w_min = w.amax(dim=-1), w.amin(dim=-1)  # [N, K/G]
    tiny = torch.finfo(torch.float16).tiny
    scales = ((w_max - w_min) / _MAX_CODE).clamp(min=tiny).to(torch.float16)  # [N, K/G]
    s = scales.to(torch.float32)
    zeros = torch.round(-w_min / s).clamp(0, _MAX_CODE)  # [N, K/G]
    codes = (torch.round(w / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, _MAX_CODE)
    codes = codes.reshape(num_out, num_in).to(torch.int32)  # [N, K]
    qweight = pack(codes.t())  # [K, N/8]
    qzeros = pack(zeros.to(torch.int32).t())  # [K/G, N/8]
    return qweight, qzeros, scales.t().contiguous()  # scales [K/G, N]


def group_size_of(qweight: torch.Tensor, scales: torch.Tensor) -> int:
    """G from the shapes: K rows of codes over K/G rows of scales."""
    num_in, num_groups = qweight.shape[0], scales.shape[0]
    assert num_groups > 0 and num_in % num_groups == 0, (
        f"qweight has {num_in} rows, not a multiple of the {num_groups} rows of scales")
    return num_in // num_groups


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an AWQ layer means, as nn.Linear holds it: [N, K] contiguous, in ``dtype``.

    Computed in float32, where it is exact, then rounded once to ``dtype``.
    """
    num_out = qweight.shape[1] * PACK_FACTOR
    assert qzeros.shape == (scales.shape[0], qweight.shape[1]), (
        f"qzeros {tuple(qzeros.shape)} does not match scales {tuple(scales.shape)} "
        f"and qweight {tuple(qweight.shape)}")
    assert scales.shape[1] == num_out, f"scales {tuple(scales.shape)} vs N={num_out}"
    group = group_size_of(qweight, scales)
    codes = unpack(qweight)  # [K, N]
    zeros = unpack(qzeros).repeat_interleave(group, dim=0)  # [K, N]
    s = scales.to(torch.float32).repeat_interleave(group, dim=0)  # [K, N]
    w = (codes - zeros).to(torch.float32) * s  # [K, N]
    return w.t().contiguous().to(dtype)  # [N, K]


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
             scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequantize(...).T -> [M, N] in x's dtype (twin of kernels.awq_gemm)."""
    return F.linear(x, dequantize(qweight, qzeros, scales, x.dtype))
