"""AWQ weights repacked along K for kvflow's one-to-few-token int4 GEMV (``kernels/awq_gemv``).

Shape letters: M = tokens, K = input features, N = output features, G = group size
(K when the checkpoint has one group over K).

Why a second layout: AutoAWQ packs eight *output columns* into an int32, so a
GEMV over it walks K one row at a time and keeps every column's partial sum
apart. Packed along K, one int32 holds eight consecutive inputs of one output
column, a row of W is a contiguous run of K/8 words, and a thread's 16-byte load
feeds 32 multiply-adds into one accumulator. Made once at load::

    AWQ (awq_format)                       kpack
    qweight  int32 [K, N/8]        ->      words         int32 [N, K/8]  (k along a row)
    qzeros   int32 [K/G, N/8]      ->      scales_zeros  fp16  [N, K/G, 2]
    scales   fp16  [K/G, N]                  [..., 0] = s (the checkpoint's, exact)
                                             [..., 1] = 16 + z (an integer, exact)

Word j of row n holds q[n, 8j + i] for i = 0..7 at these bits (``NIBBLE_LOW_BIT``)::

    i:        0      1      2      3     4      5      6     7
    bits:   19..22 15..18 11..14  7..10 27..30 23..26  3..6  31, 0..2  (q's lowest bit at 31)
    class:    A      B      A      B     A      B      A     A

The kernel turns a code into a float with one mask-and-or, no int->float
conversion: ``(word' & mask) | 0x3F800000`` reads as 1 + q/16 (class A, the nibble
in mantissa bits 19..22) or 1 + q/256 (class B, bits 15..18), where word' is the
word itself, shifted left by 8 or 16, shifted right by 8, or rotated left by 20
(i = 7, hence its wrapped bits): five states of a word give two codes each at
most, so eight codes cost four shifts, eight and-ors and one FMA per token each.
Class B's x is taken times 16, so both classes add x * q / 16 on top of a
row-independent offset the kernel subtracts per group (its docstring has the
algebra). The scale and zero stay exact (fp16 s, integer 16 + z): the kernel is
exact up to float32 summation, as the AWQ Triton path is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvflow.quantization import awq_format

PACK = 8
"""Codes per int32 word."""
NIBBLE_LOW_BIT = (19, 15, 11, 7, 3, 31, 27, 23)
"""Bit of the lowest bit of code i (k = 8j + i) in word j; its four bits are
(low + b) mod 32 for b = 0..3 (only i = 7 wraps)."""
X_SCALE = (1, 16, 256, 1, 16, 256, 1, 16)
"""The kernel reads code i as 1 + q / (16 * X_SCALE[i]) and takes x_i times X_SCALE[i]."""


@dataclass(frozen=True)
class KPackWeight:
    """One linear layer in the kpack layout (owned by the layer that holds it)."""

    words: torch.Tensor
    """int32 [N, K/8]: codes, eight consecutive k per word (``NIBBLE_LOW_BIT``)."""
    scales_zeros: torch.Tensor
    """fp16 [N, K/G, 2]: the checkpoint's scale and 16 + zero per group and column."""
    group_size: int
    """G (K for one group over K)."""


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """int [N, K] codes in 0..15 -> int32 [N, K/8] words (K a multiple of 8)."""
    num_out, num_in = codes.shape
    assert num_in % PACK == 0, f"K={num_in} is not a multiple of {PACK}"
    grouped = codes.to(torch.int64).reshape(num_out, num_in // PACK, PACK)  # [N, K/8, 8]
    word = torch.zeros(num_out, num_in // PACK, dtype=torch.int64, device=codes.device)
    for i, low in enumerate(NIBBLE_LOW_BIT):
        q = grouped[..., i]
        rotated = (q << low) | (q >> (32 - low))  # rotl32: only i = 7 spills past bit 31
        word |= rotated & 0xFFFFFFFF
    word = torch.where(word >= 2**31, word - 2**32, word)  # as a signed int32
    return word.to(torch.int32)


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] words -> int32 [N, K] codes (inverse of ``pack_words``)."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF  # [N, K/8]
    codes = []
    for low in NIBBLE_LOW_BIT:
        rotated = ((unsigned >> low) | (unsigned << (32 - low))) & 0xFFFFFFFF  # rotr32
        codes.append(rotated & 0xF)
    return torch.stack(codes, dim=-1).reshape(words.shape[0], -1).to(torch.int32)  # [N, K]


def convert_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
                ) -> KPackWeight:
    """AutoAWQ's GEMM tensors -> the kpack layout, on their device (plain torch)."""
    num_in = qweight.shape[0]
    group = awq_format.group_size_of(qweight, scales)
    codes = awq_format.unpack(qweight).t().contiguous()  # [K, N] -> [N, K]
    zeros = awq_format.unpack(qzeros).t()  # [N, K/G]
    assert scales.dtype == torch.float16, f"AWQ scales are float16, got {scales.dtype}"
    scales_zeros = torch.stack([scales.t(), (16 + zeros).to(torch.float16)], dim=-1)
    assert scales_zeros.shape[1] * group == num_in
    return KPackWeight(pack_words(codes), scales_zeros.contiguous(), group)


def dequantize_kpack(weight: KPackWeight) -> torch.Tensor:
    """The float32 [N, K] weight a kpack layer means: (q - z) * s (the reference)."""
    codes = unpack_words(weight.words).to(torch.float32)  # [N, K]
    num_out, num_in = codes.shape
    scale = weight.scales_zeros[..., 0].to(torch.float32)  # [N, K/G]
    zero = weight.scales_zeros[..., 1].to(torch.float32) - 16  # [N, K/G]
    grouped = codes.reshape(num_out, num_in // weight.group_size, weight.group_size)
    return ((grouped - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(num_out, num_in)


def kpack_linear_ref(x: torch.Tensor, weight: KPackWeight,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) in float32, rounded once to x's dtype: the kernel's twin."""
    y = x.to(torch.float32) @ dequantize_kpack(weight).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
