"""AWQ weights on PyTorch's built-in int4 kernel (tinygemm, ``torch._weight_int4pack_mm``).

Shape letters: M = tokens, K = input features, N = output features, G = AWQ group
size, T = tinygemm's group size (G, or 128 when the checkpoint has one group over K).

Why: the Triton one-token GEMV (``kvflow.kernels.awq_gemm``) is issue-bound at
batch 1, while tinygemm -- the kernel gpt-fast decodes with -- is a hand-tuned
CUDA int4 x bf16 tensor-core kernel shipped inside torch (sm80+), so using it adds
no compiled code of ours. It wants its own layout, made once at load:

    AWQ (awq_format)                       tinygemm
    qweight  int32 [K, N/8]  nibbles  ->   codes int32 [N, K] (k along a row)
                                             CUDA: uint8 [N, K/2], k even in the high
                                             nibble, then _convert_weight_to_int4pack
                                             -> int32 [N/8, K/(16*tiles), 32, tiles/2]
                                             CPU:  _convert_weight_to_int4pack_for_cpu
                                             takes the int32 [N, K] codes -> uint8 [N, K/2]
    qzeros   int32 [K/G, N/8]         ->   scales_and_zeros bf16 [K/T, N, 2]
    scales   fp16  [K/G, N]                  [..., 0] = scale, [..., 1] = zero

The two conventions, for one group::

    AWQ:       w = (q - z) * s
    tinygemm:  w = (q - 8) * scale + zero
    so         scale = s,  zero = (8 - z) * s

Precision: tinygemm holds scale and zero in bfloat16 (8 significant bits) where the
checkpoint has float16 scales (11 bits), so a weight moves by up to about
(|q - z| + 8) * s * 2^-9 -- the Triton path is exact up to one rounding of w.
The zero is computed from the *rounded* scale, so w is exactly 0 wherever q = z
and (8 - z) * scale fits bfloat16 (always when z = 8). Where scales already are
bfloat16 values with at most 4 significant bits, the conversion is exact
(the tests use that to compare bit for bit).

tinygemm computes in bfloat16 only (the CUDA kernel refuses other activations);
float16 models stay on the Triton path: casting activations to bfloat16 would cost
3 mantissa bits on every input, which is a model change, not a kernel choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvflow.quantization import awq_format

GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes tinygemm accepts (``qGroupSize``)."""
INNER_K_TILES = (8, 4, 2)
"""tinygemm's inner k tiles (16 inputs each), preferred first: 8 is gpt-fast's default."""
ONE_GROUP_SIZE = 128
"""tinygemm group used for a checkpoint with one group over all of K (``group_size=-1``):
its one row of scales and zeros is repeated every 128 inputs."""
N_MULTIPLE = 16
"""Output features must be a multiple of this: torch's CPU repack demands 16 (CUDA's
n tile is 8); one rule for both keeps the CPU tests a model of the GPU path."""
DTYPE = torch.bfloat16
"""The only activation dtype tinygemm computes in."""


@dataclass(frozen=True)
class Int4PackWeight:
    """One linear layer in tinygemm's layout (owned by the layer that holds it)."""

    packed: torch.Tensor
    """Device-specific packed codes (CUDA: int32 4-D, CPU: uint8 [N, K/2])."""
    scales_and_zeros: torch.Tensor
    """bf16 [K/T, N, 2]: scale and zero of each group and output column."""
    group_size: int
    """T, tinygemm's ``qGroupSize``."""


def has_kernel(device: torch.device) -> bool:
    """Whether this torch has tinygemm for ``device`` (CUDA needs sm80 or newer)."""
    aten = torch.ops.aten
    if device.type == "cuda":
        return (hasattr(aten, "_weight_int4pack_mm") and hasattr(aten, "_convert_weight_to_int4pack")
                and torch.cuda.get_device_capability(device) >= (8, 0))
    if device.type == "cpu":
        return (hasattr(aten, "_weight_int4pack_mm_for_cpu")
                and hasattr(aten, "_convert_weight_to_int4pack_for_cpu"))
    return False


def tinygemm_group_size(num_in: int, group_size: Optional[int]) -> Optional[int]:
    """T for an AWQ layer with K = ``num_in`` and G = ``group_size`` (None: one group),
    or None when tinygemm cannot express it."""
    if group_size is None:
        return ONE_GROUP_SIZE if num_in % ONE_GROUP_SIZE == 0 else None
    return group_size if group_size in GROUP_SIZES and num_in % group_size == 0 else None


def inner_k_tiles_for(num_in: int) -> Optional[int]:
    """The largest inner-k-tile count whose k span (16 * tiles) divides K, or None."""
    for tiles in INNER_K_TILES:
        if num_in % (16 * tiles) == 0:
            return tiles
    return None


def unsupported_reason(num_in: int, num_out: int, group_size: Optional[int],
                       dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why tinygemm cannot run this layer (None when it can), for logs and errors."""
    if dtype != DTYPE:
        return (f"tinygemm computes in bfloat16 only and this model runs in {dtype}; "
                "load it with dtype=bfloat16")
    if not has_kernel(device):
        return f"torch {torch.__version__} has no tinygemm int4 kernel for {device} (CUDA needs sm80+)"
    if num_out % N_MULTIPLE:
        return f"N={num_out} is not a multiple of {N_MULTIPLE}"
    if tinygemm_group_size(num_in, group_size) is None:
        return (f"group_size={group_size} over K={num_in} does not map to a tinygemm group "
                f"size {GROUP_SIZES}")
    if inner_k_tiles_for(num_in) is None:
        return f"K={num_in} is not a multiple of 32 (tinygemm's smallest k tile span)"
    return None


def awq_to_tinygemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ tensors -> (codes int32 [N, K], scales_and_zeros bf16 [K/T, N, 2]), T = ``group_size``.

    Plain torch on the tensors' device; the codes are not yet packed (``pack_codes``).
    """
    num_in = qweight.shape[0]
    awq_group = awq_format.group_size_of(qweight, scales)
    assert awq_group % group_size == 0, f"AWQ group {awq_group} is not a multiple of T={group_size}"
    codes = awq_format.unpack(qweight).t().contiguous()  # [K, N] -> [N, K]
    zeros = awq_format.unpack(qzeros)  # [K/G, N]
    scale = scales.to(DTYPE)  # [K/G, N], rounded once
    # zero = (8 - z) * scale, from the rounded scale, computed in float32 then rounded once.
    zero = ((8 - zeros).to(torch.float32) * scale.to(torch.float32)).to(DTYPE)  # [K/G, N]
    repeat = awq_group // group_size  # > 1 only for one group over K
    scales_and_zeros = torch.stack([scale, zero], dim=-1)  # [K/G, N, 2]
    scales_and_zeros = scales_and_zeros.repeat_interleave(repeat, dim=0)  # [K/T, N, 2]
    assert scales_and_zeros.shape[0] * group_size == num_in
    return codes, scales_and_zeros.contiguous()


def pack_codes(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """int32 codes [N, K] in 0..15 -> tinygemm's packed weight for the codes' device."""
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32),
                                                                  inner_k_tiles)
    # CUDA takes two codes a byte, even k in the high nibble: uint8 [N, K/2].
    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)


def convert_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group_size: Optional[int]) -> Int4PackWeight:
    """An AWQ layer (``group_size`` None: one group over K) -> tinygemm's layout.

    The caller checked ``unsupported_reason`` first; a shape tinygemm cannot take
    is an internal error here.
    """
    num_in = qweight.shape[0]
    group = tinygemm_group_size(num_in, group_size)
    tiles = inner_k_tiles_for(num_in)
    assert group is not None and tiles is not None, f"K={num_in} G={group_size}: not for tinygemm"
    codes, scales_and_zeros = awq_to_tinygemm(qweight, qzeros, scales, group)
    return Int4PackWeight(pack_codes(codes, tiles), scales_and_zeros, group)


def dequantize_tinygemm(codes: torch.Tensor, scales_and_zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """The weight tinygemm means, float32 [N, K]: (q - 8) * scale + zero per group
    (the reference of its convention; the conversion tests diff it against AWQ's)."""
    num_out, num_in = codes.shape
    scale = scales_and_zeros[..., 0].to(torch.float32).t()  # [N, K/T]
    zero = scales_and_zeros[..., 1].to(torch.float32).t()  # [N, K/T]
    grouped = (codes.to(torch.float32) - 8).reshape(num_out, num_in // group_size, group_size)
    return (grouped * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(num_out, num_in)


def int4pack_linear(x: torch.Tensor, weight: Int4PackWeight,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] bf16 @ W.T (+ bias) -> [..., N] bf16 through tinygemm."""
    if x.dtype != DTYPE:
        raise ValueError(f"int4pack_linear needs bfloat16 activations (tinygemm computes in "
                         f"bfloat16 only), got {x.dtype}; use the Triton AWQ path "
                         "(KVFLOW_AWQ_KERNEL=triton) for other dtypes.")
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    if x2d.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, weight.packed, weight.group_size,
                                                       weight.scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm(x2d, weight.packed, weight.group_size,
                                               weight.scales_and_zeros)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])  # [..., N]
