"""AWQ weights repacked as nibble pairs for half2 arithmetic (``kernels/awq_gemv_h2``).

Shape letters: K = input features, N = output features, G = group size (K when the
checkpoint has one group over K), B = blocks of 32 inputs (K/32).

Why a third layout: the K-packed GEMV (``awq_kpack``) turns each code into a float32
and spends an FMA per weight; at one token it needs ~3.3 instructions a weight. Here
one bit-and-or turns *two* codes into a half2 (fp16 pair) and the multiply-adds run
two at a time (``fma.rn.f16x2``), so a weight costs ~2 instructions. The catch: the
two codes of a half2 must meet the two x of one 32-bit load, so a word holds pairs of
consecutive inputs, and the four words of one 16-byte load are laid out so that pair
j of all four comes from one 16-byte load of x::

    block b = inputs 32b .. 32b+31 = 4 words (t = 0..3), one 16-byte load
    word t of block b, pair j (j = 0..3) holds inputs k = 32b + 8j + 2t (low half)
                                                 and k + 1           (high half)
    bits:  low half  4j .. 4j+3   (code of k)
           high half 16+4j .. 19+4j (code of k+1)

    x viewed as int32 pairs P[i] = (x[2i], x[2i+1]): pair j of word t of block b is
    P[16b + 4j + t], so for fixed j the four words read P[16b + 4j + 0..3].

The kernel turns a pair into a half2 with one bit-and-or: the nibbles moved to mantissa
bits 4..7 of each half and or-ed into fp16 1.0 (0x3C00) read as 1 + q/64, exactly;
subtracting the half2 (1 + z/64, 1 + z/64) leaves (q - z)/64, exactly. Pair 1 sits at
bits 4..7 already, pairs 0, 2, 3 take one shift each (left 4, right 4, right 8). The
kernel multiplies (q - z)/64 by x in fp16 (a product is at most 15/64 of |x|, so a
block's fp16 sum of 16 products overflows only past |x| ~ 17,000) and scales by 64 s
in float32 per block.

Per group and column the layout keeps one int32 ``scales_zeros``: low half the
checkpoint's fp16 scale s (exact), high half fp16 1 + z/64 (exact). 4 bytes a group,
as kpack and tinygemm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvflow.quantization import awq_format

BLOCK = 32
"""Inputs per block of four words (one 16-byte load)."""
CODE_SCALE = 64
"""A code q reads as 1 + q / CODE_SCALE in fp16 (nibble in mantissa bits 4..7 of 1.0)."""


@dataclass(frozen=True)
class H2Weight:
    """One linear layer in the half2 layout (owned by the layer that holds it)."""

    words: torch.Tensor
    """int32 [N, K/8]: nibble pairs as in the module docstring."""
    scales_zeros: torch.Tensor
    """int32 [N, K/G]: low half fp16 s, high half fp16 1 + z/64."""
    group_size: int
    """G (K for one group over K); a multiple of 32."""


def unsupported_reason(num_in: int, group_size: Optional[int]) -> Optional[str]:
    """Why a [*, K] layer of group ``group_size`` (None: one group over K) cannot take this
    layout, or None."""
    group = num_in if group_size is None else group_size
    if num_in % BLOCK:
        return f"K={num_in} is not a multiple of {BLOCK}"
    if group % BLOCK or num_in % group:
        return f"group_size={group} is not a multiple of {BLOCK} dividing K={num_in}"
    return None


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """int [N, K] codes in 0..15 -> int32 [N, K/8] words (K a multiple of 32)."""
    num_out, num_in = codes.shape
    assert num_in % BLOCK == 0, f"K={num_in} is not a multiple of {BLOCK}"
    assert codes.numel() == 0 or (int(codes.min()) >= 0 and int(codes.max()) <= 15), (
        "codes must lie in 0..15")
    # k = 32b + 8j + 2t + h  ->  [N, B, j, t, h]
    grouped = codes.to(torch.int64).reshape(num_out, num_in // BLOCK, 4, 4, 2)
    word = torch.zeros(num_out, num_in // BLOCK, 4, dtype=torch.int64, device=codes.device)
    for j in range(4):
        word |= grouped[:, :, j, :, 0] << (4 * j)
        word |= grouped[:, :, j, :, 1] << (16 + 4 * j)
    word = torch.where(word >= 2**31, word - 2**32, word)  # as a signed int32
    return word.reshape(num_out, num_in // 8).to(torch.int32)  # [N, B * 4]


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] words -> int32 [N, K] codes (inverse of ``pack_words``)."""
    num_out = words.shape[0]
    unsigned = (words.to(torch.int64) & 0xFFFFFFFF).reshape(num_out, -1, 4)  # [N, B, t]
    parts = []
    for j in range(4):
        low = (unsigned >> (4 * j)) & 0xF
        high = (unsigned >> (16 + 4 * j)) & 0xF
        parts.append(torch.stack([low, high], dim=-1))  # [N, B, t, h]
    codes = torch.stack(parts, dim=2)  # [N, B, j, t, h]
    return codes.reshape(num_out, -1).to(torch.int32)


def pack_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp16 s [N, C] and integer z [N, C] -> int32 [N, C] (low half s, high 1 + z/64)."""
    low = scales.to(torch.float16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    high = (1 + zeros.to(torch.float32) / CODE_SCALE).to(torch.float16).contiguous().view(torch.int16).to(torch.int32)
    return (low | (high << 16)).contiguous()


def unpack_scales_zeros(scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 [N, C] -> (fp16 s [N, C], float32 z [N, C])."""
    low = (scales_zeros & 0xFFFF).to(torch.int16).view(torch.float16)
    high = (scales_zeros >> 16).to(torch.int16).view(torch.float16)
    return low, (high.to(torch.float32) - 1) * CODE_SCALE


def convert_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> H2Weight:
    """AutoAWQ's GEMM tensors -> the half2 layout, on their device (plain torch)."""
    num_in = qweight.shape[0]
    group = awq_format.group_size_of(qweight, scales)
    reason = unsupported_reason(num_in, group)
    assert reason is None, reason
    assert scales.dtype == torch.float16, f"AWQ scales are float16, got {scales.dtype}"
    codes = awq_format.unpack(qweight).t().contiguous()  # [K, N] -> [N, K]
    zeros = awq_format.unpack(qzeros).t()  # [N, K/G]
    return H2Weight(pack_words(codes), pack_scales_zeros(scales.t(), zeros), group)


def dequantize_h2(weight: H2Weight) -> torch.Tensor:
    """The float32 [N, K] weight an H2 layer means: (q - z) * s (the reference)."""
    codes = unpack_words(weight.words).to(torch.float32)  # [N, K]
    num_out, num_in = codes.shape
    scale, zero = unpack_scales_zeros(weight.scales_zeros)
    grouped = codes.reshape(num_out, num_in // weight.group_size, weight.group_size)
    deq = (grouped - zero.unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return deq.reshape(num_out, num_in)


def h2_linear_ref(x: torch.Tensor, weight: H2Weight,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) in float32, rounded once to x's dtype: the kernel's twin."""
    y = x.to(torch.float32) @ dequantize_h2(weight).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
