"""AWQ int4 kernels (Triton): matmuls with the dequantization fused in, and a dequantizer.

Shape letters: M = tokens, K = input features, N = output features, G = group size.
The layout (``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8], ``scales``
fp16 [K/G, N], AutoAWQ's nibble order) is drawn in ``kvflow.quantization.awq_format``,
which also holds the plain-torch references ``awq_gemm`` and ``dequantize`` with
the same signatures as the launchers here.

The fused matmuls exist for decode: at a few tokens a step the matmul is bound by
reading weights, and int4 codes are a quarter of the bytes of bf16. Each program
owns a [BLOCK_M, BLOCK_N] tile of the output and walks K in BLOCK_K steps::

         K ->                       N ->
    x  [BLOCK_M, BLOCK_K]   @   W [BLOCK_K, BLOCK_N]  (built in registers from
                                qweight [BLOCK_K, BLOCK_N/8] + one row of qzeros/scales)

Two kernels share that walk. ``_awq_gemv_kernel`` (M <= 4) keeps W as
[BLOCK_K, BLOCK_N/8, 8] (packed column, nibble) and multiplies on the CUDA
cores: no reshape, no tensor cores, which at one token would idle 15 of 16
rows. ``_awq_gemm_kernel`` flattens W to [BLOCK_K, BLOCK_N] for ``tl.dot``.

BLOCK_K divides G (or the whole of K is one group), so every K step needs one
row of zeros and scales, and W = q * s - z * s is one multiply-add per element
after ``z * s`` is formed once per column (exact in float32, like the reference).
With few tokens the grid has too few tiles to fill the GPU; SPLIT_K programs
then share one tile's K range and write float32 partial sums that the launcher
adds up (in a fixed order: results do not depend on timing).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

_PACK = 8


@triton.jit
def _nibble_shifts():
    """Bit offset of column j (j = 0..7) in its int32: j // 2 + 4 * (j % 2) nibbles
    (AutoAWQ's 0,2,4,6,1,3,5,7 packing order, inverted). int32 [8]."""
    j = tl.arange(0, 8)
    return ((j >> 1) + (j & 1) * 4) * 4


@triton.jit
def _unpack_columns(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 [ROWS, COLS/8] -> int32 [ROWS, COLS] 4-bit codes, in column order."""
    shifts = _nibble_shifts()
    codes = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [ROWS, COLS/8, 8]
    return tl.reshape(codes, (ROWS, COLS))


@triton.jit
def _awq_gemv_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """All M (<= BLOCK_M) tokens against BLOCK_N output columns, over every SPLIT_K-th K step.

    Grid: ``(1, cdiv(N, BLOCK_N), SPLIT_K)``.

    Constexprs:
      BLOCK_M: power of two >= M; each weight tile is dequantized once for all tokens.
      BLOCK_N: output columns per program, a multiple of 8; BLOCK_N / 8 int32s per
               qweight row are read contiguously.
      BLOCK_K: input features per step; divides ``group_size`` unless K is one group.
      SPLIT_K: as in ``_awq_gemm_kernel``.
    W stays exact in float32 (no rounding to x's dtype, unlike the tensor-core path):
    rounding would cost two conversions per weight on the ALU, which at one token
    competes with the memory stream.
    """
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    packed_n = N // 8
    offs_m = tl.arange(0, BLOCK_M)
    offs_pn = pid_n * PACKED_N + tl.arange(0, PACKED_N)  # [PN]
    shifts = _nibble_shifts()  # [8]
    offs_n = offs_pn[:, None] * 8 + tl.arange(0, 8)[None, :]  # [PN, 8] output columns
    mask_m = offs_m < M
    mask_pn = offs_pn < packed_n
    acc = tl.zeros((BLOCK_M, PACKED_N, 8), dtype=tl.float32)
    for step in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        group = (step * BLOCK_K) // group_size
        q = tl.load(qweight_ptr + offs_k[:, None].to(tl.int64) * packed_n + offs_pn[None, :],
                    mask=mask_k[:, None] & mask_pn[None, :], other=0)  # [BK, PN]
        z = tl.load(qzeros_ptr + group * packed_n + offs_pn, mask=mask_pn, other=0)  # [PN]
        s = tl.load(scales_ptr + group * N + offs_n, mask=mask_pn[:, None],
                    other=0.0).to(tl.float32)  # [PN, 8]
        zs = ((z[:, None] >> shifts[None, :]) & 0xF).to(tl.float32) * s  # [PN, 8]
        codes = ((q[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)  # [BK, PN, 8]
        w = codes * s[None, :, :] - zs[None, :, :]  # [BK, PN, 8]
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # [BM, BK]
        acc += tl.sum(x[:, :, None, None] * w[None, :, :, :], axis=1)  # [BM, PN, 8]
    out_ptrs = (out_ptr + pid_k * stride_os + offs_m[:, None, None].to(tl.int64) * stride_om
                + offs_n[None, :, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None, None] & mask_pn[None, :, None])


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over every SPLIT_K-th K step, on tensor cores.

    Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K)``.

    Constexprs:
      BLOCK_M: tokens per tile (>= 16, tl.dot's minimum).
      BLOCK_N: output columns per tile; a multiple of 8 (whole int32s of qweight).
      BLOCK_K: input features per step; divides ``group_size`` unless K is one group,
               so a step reads one row of qzeros and scales.
      SPLIT_K: programs sharing a tile. With 1, the tile is stored in out's dtype;
               otherwise program k stores float32 partial sums at out + k * stride_os.
      UPCAST:  CPU interpreter only: it multiplies bfloat16 tl.dot operands as raw
               bits, so the rounded operands are widened to float32 first (their
               products are exact there, as in the tensor cores).
    W is rounded to x's dtype before the dot, as the reference's weight is.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    packed_n = N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_pn = offs_pn < packed_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        q = tl.load(qweight_ptr + offs_k[:, None].to(tl.int64) * packed_n + offs_pn[None, :],
                    mask=mask_k[:, None] & mask_pn[None, :], other=0)  # [BK, BN/8]
        group = (step * BLOCK_K) // group_size
        z = tl.load(qzeros_ptr + group * packed_n + offs_pn, mask=mask_pn, other=0)  # [BN/8]
        s = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zeros = tl.reshape(_unpack_columns(z[None, :], 1, BLOCK_N), (BLOCK_N,))  # [BN]
        zs = zeros.to(tl.float32) * s  # [BN]
        codes = _unpack_columns(q, BLOCK_K, BLOCK_N).to(tl.float32)  # [BK, BN]
        w = (codes * s[None, :] - zs[None, :]).to(x_ptr.dtype.element_ty)  # [BK, BN]
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    out_ptrs = (out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om
                + offs_n[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over s of partial[s, i], added in split order, stored in out's dtype.

    Grid: ``(cdiv(numel, BLOCK),)``; partial is [SPLIT_K, numel] float32 contiguous.
    One launch for what ``partial.sum(0)`` and a cast would do in two: decode runs
    this once per linear layer, so launches count.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + split * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _awq_dequantize_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,
    N, K, group_size,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes out[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n] for one tile.

    Grid: ``(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))``; ``out`` is [N, K] contiguous.

    Constexprs:
      BLOCK_K: input rows per tile; rows of one tile may span several groups.
      BLOCK_N: output columns per tile, a multiple of 8.
    """
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    packed_n = N // 8
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask_kp = mask_k[:, None] & (offs_pn < packed_n)[None, :]
    groups = offs_k // group_size  # [BK]
    q = tl.load(qweight_ptr + offs_k[:, None].to(tl.int64) * packed_n + offs_pn[None, :],
                mask=mask_kp, other=0)  # [BK, BN/8]
    z = tl.load(qzeros_ptr + groups[:, None] * packed_n + offs_pn[None, :],
                mask=mask_kp, other=0)  # [BK, BN/8]
    s = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :],
                mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
    codes = _unpack_columns(q, BLOCK_K, BLOCK_N)
    zeros = _unpack_columns(z, BLOCK_K, BLOCK_N)
    w = ((codes - zeros).to(tl.float32) * s.to(tl.float32)).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # [BN, BK]
    tl.store(out_ptrs, tl.trans(w), mask=mask_n[:, None] & mask_k[None, :])


GEMV_MAX_TOKENS = 4
"""Batches up to this many tokens run ``_awq_gemv_kernel`` by default."""


@dataclass(frozen=True)
class AWQGemmConfig:
    """Which fused kernel runs and its tile shape (see the kernels' docstrings)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_tensor_cores: bool = True
    """True: ``_awq_gemm_kernel`` (tl.dot); False: ``_awq_gemv_kernel``."""


@lru_cache(maxsize=8)
def _num_sms(device_index: Optional[int]) -> int:
    if device_index is None:
        return 4  # the CPU interpreter: small, so tests exercise split-K
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@lru_cache(maxsize=4096)
def default_gemm_config(m: int, n: int, k: int, group_size: int,
                        device: torch.device) -> AWQGemmConfig:
    """A kernel and tile shape for the problem: first guesses, to be tuned on the GPU.

    Few tokens: the CUDA-core GEMV with wide column blocks, split over K until the
    grid covers the SMs twice (decode is bound by weight reads, so every SM should
    stream qweight). More tokens: tensor-core tiles, square once M is large.
    """
    block_k = min(128, group_size) if group_size < k else 128
    use_tensor_cores = m > GEMV_MAX_TOKENS
    if not use_tensor_cores:
        block_m, block_n, warps = triton.next_power_of_2(m), 128, 4
        block_k = min(block_k, 64)  # [BM, BK, BN] products live in registers
    elif m <= 16:
        block_m, block_n, warps = 16, 128, 4
    elif m <= 32:
        block_m, block_n, warps = 32, 128, 4
    elif m <= 64:
        block_m, block_n, warps = 64, 128, 4
    else:
        block_m, block_n, warps = 128, 128, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    sms = _num_sms(device.index if device.type == "cuda" else None)
    split_k = 1
    while tiles * split_k < 2 * sms and split_k * 2 <= steps // 2:
        split_k *= 2
    return AWQGemmConfig(block_m, block_n, block_k, split_k, num_warps=warps,
                         use_tensor_cores=use_tensor_cores)


def _check_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
                  ) -> tuple[int, int, int]:
    """Asserts the AWQ layout; returns (K, N, G)."""
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32, (
        f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    assert scales.dtype in (torch.float16, torch.bfloat16, torch.float32), scales.dtype
    assert qweight.dim() == qzeros.dim() == scales.dim() == 2
    assert qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous(), (
        "qweight, qzeros and scales must be contiguous")
    num_in, num_out = qweight.shape[0], qweight.shape[1] * _PACK
    num_groups = scales.shape[0]
    assert scales.shape == (num_groups, num_out), (
        f"scales {tuple(scales.shape)} must be [K/G, N] = [{num_groups}, {num_out}]")
    assert qzeros.shape == (num_groups, qweight.shape[1]), (
        f"qzeros {tuple(qzeros.shape)} must be [K/G, N/8] = [{num_groups}, {qweight.shape[1]}]")
    assert num_groups > 0 and num_in % num_groups == 0, (
        f"K={num_in} is not a multiple of the {num_groups} groups")
    assert qweight.device == qzeros.device == scales.device
    return num_in, num_out, num_in // num_groups


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
             scales: torch.Tensor, config: Optional[AWQGemmConfig] = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16) @ dequant(qweight).T -> [M, N] in x's dtype; inputs are read only."""
    num_in, num_out, group = _check_packed(qweight, qzeros, scales)
    assert x.dim() == 2 and x.shape[1] == num_in, (
        f"x must be [M, K={num_in}], got {tuple(x.shape)}")
    assert x.dtype in (torch.float16, torch.bfloat16), f"x must be fp16/bf16, got {x.dtype}"
    assert x.stride(1) == 1, "x's K dim must be contiguous"
    assert x.device == qweight.device
    num_tokens = x.shape[0]
    out = torch.empty(num_tokens, num_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    cfg = config or default_gemm_config(num_tokens, num_out, num_in, group, x.device)
    assert cfg.block_n % _PACK == 0 and cfg.block_k >= 16, cfg
    assert group % cfg.block_k == 0 or group == num_in, (
        f"block_k={cfg.block_k} must divide group_size={group} (or K={num_in} be one group)")
    if cfg.split_k > 1:
        partial = torch.empty(cfg.split_k, num_tokens, num_out, dtype=torch.float32,
                              device=x.device)
        target, stride_split = partial, partial.stride(0)
    else:
        target, stride_split = out, 0
    args = (x, qweight, qzeros, scales, target, num_tokens, num_out, num_in, group,
            x.stride(0), stride_split, target.stride(-2))
    if cfg.use_tensor_cores:
        assert min(cfg.block_m, cfg.block_n) >= 16, f"tl.dot needs 16x16 tiles: {cfg}"
        grid = (triton.cdiv(num_tokens, cfg.block_m), triton.cdiv(num_out, cfg.block_n),
                cfg.split_k)
        _awq_gemm_kernel[grid](
            *args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=cfg.split_k, UPCAST=x.device.type != "cuda",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        assert num_tokens <= cfg.block_m, f"the GEMV holds all {num_tokens} tokens: {cfg}"
        grid = (1, triton.cdiv(num_out, cfg.block_n), cfg.split_k)
        _awq_gemv_kernel[grid](
            *args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k > 1:
        numel = num_tokens * num_out
        _sum_splits_kernel[(triton.cdiv(numel, 1024),)](partial, out, numel,
                                                        SPLIT_K=cfg.split_k, BLOCK=1024)
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The [N, K] weight (contiguous, in ``dtype``) the packed tensors mean."""
    num_in, num_out, group = _check_packed(qweight, qzeros, scales)
    assert dtype in (torch.float16, torch.bfloat16, torch.float32), dtype
    out = torch.empty(num_out, num_in, dtype=dtype, device=qweight.device)
    block_k, block_n = 64, 64
    grid = (triton.cdiv(num_in, block_k), triton.cdiv(num_out, block_n))
    _awq_dequantize_kernel[grid](qweight, qzeros, scales, out, num_out, num_in, group,
                                 BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return out
