"""AWQ int4 kernels (Triton): matmuls with the dequantization fused in, and a dequantizer.

Shape letters: M = tokens, K = input features, N = output features, G = group size,
S = K splits. The layout (``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8],
``scales`` fp16 [K/G, N], AutoAWQ's nibble order) is drawn in
``kvflow.quantization.awq_format``, which also holds the plain-torch references
``awq_gemm`` and ``dequantize`` with the same signatures as the launchers here.

The fused matmuls exist for decode: at a few tokens a step the matmul is bound by
reading weights, and int4 codes are a quarter of the bytes of bf16. Every program
walks a K range of one column tile::

         K ->                       N ->
    x  [BLOCK_M, BLOCK_K]   @   W [BLOCK_K, BLOCK_N]   built in registers from
                                qweight [BLOCK_K, BLOCK_N/8] and a row of qzeros/scales

When the column tiles are too few to cover the SMs, S programs share one tile's
K range (split-K) and write float32 partial sums that
``kvflow.kernels.gemv.sum_splits`` adds up in split order (deterministic).

``_awq_gemv_kernel`` (one token) multiplies on the CUDA cores in float32 and
never forms W: within a group, sum_k x[k] * (q[k, n] - z[n]) * s[n] =
s[n] * (sum_k x[k] * q[k, n] - z[n] * sum_k x[k]), so the inner loop costs a
shift, a mask, an add and an FMA per weight, and zeros and scales are applied
once per group. ``_awq_gemm_kernel`` (more tokens) rounds W to x's dtype and
uses ``tl.dot``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels.gemv import k_split, split_k_epilogue, sum_splits

_PACK = 8


@triton.jit
def _codes(packed, ROWS: tl.constexpr, PACKED: tl.constexpr):
    """int32 [ROWS, PACKED] -> int32 [ROWS, PACKED * 8] 4-bit codes, in column order.

    Column 4a + 2b + t (a, b, t in {0, 1}) of an int32 sits at bits
    4 * (2a + b + 4t) (AutoAWQ's 0,2,4,6,1,3,5,7 nibble order, inverted).
    ``tl.join`` appends a size-2 axis held in each thread's registers, so three
    levels of joins build [ROWS, PACKED, a, b, t] and the reshape to columns
    moves no data (a [K, N/8, 8] broadcast instead gets a layout that spreads
    the eight columns over threads and shuffles through shared memory)::

        t = 0 (even columns): bits  0  8 | 4 12     (b = 0 | b = 1; a picks within)
        t = 1 (odd columns):  bits 16 24 | 20 28
    """
    even = tl.join(tl.join(packed, packed >> 8), tl.join(packed >> 4, packed >> 12))
    odd = tl.join(tl.join(packed >> 16, packed >> 24), tl.join(packed >> 20, packed >> 28))
    return tl.reshape(tl.join(even, odd) & 0xF, (ROWS, PACKED * 8))


@triton.jit
def _mantissas(packed, ROWS: tl.constexpr, PACKED: tl.constexpr):
    """int32 [ROWS, PACKED] -> float32 [ROWS, PACKED * 8] = 1 + code / 16, in column order.

    Each code is shifted straight into mantissa bits 19..22 of the float 1.0
    (bits 0x3F800000), so a code costs one shift and one and-or: no int->float
    conversion and no subtraction. The columns are laid out as in ``_codes``
    (the shift that lands the nibble at bit 4 * (2a + b + 4t) on bit 19).
    """
    even = tl.join(tl.join(packed << 19, packed << 11), tl.join(packed << 15, packed << 7))
    odd = tl.join(tl.join(packed << 3, packed >> 5), tl.join(packed >> 1, packed >> 9))
    bits = (tl.join(even, odd) & 0x780000) | 0x3F800000
    return tl.reshape(bits.to(tl.float32, bitcast=True), (ROWS, PACKED * 8))


@triton.jit
def _packed_columns(pid_n, N, BLOCK_N: tl.constexpr):
    """Tile ``pid_n``'s output columns and their int32 columns of qweight/qzeros (eight
    columns each), with the masks past N: (offs_n [BN], offs_pn [BN/8], mask_n, mask_pn)."""
    PACKED_N: tl.constexpr = BLOCK_N // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pn = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    return offs_n, offs_pn, offs_n < N, offs_pn < N // 8


@triton.jit
def _exact_float(codes):
    """int32 codes in 0..15 -> the same values in float32, without an int->float
    conversion (a quarter-rate instruction on the GPU): ``code | 0x4B000000`` is
    the float 2^23 + code, and subtracting 2^23 is exact."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _awq_gemv_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr,
    N, K, k_per_split,
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One token against BLOCK_N output columns over K range s of program (n, s).

    Grid: ``(cdiv(N, BLOCK_N), S)``; program s covers [s * k_per_split, + k_per_split).
    A step is BLOCK_K rows of one group g, read one row at a time::

        dots[n] = sum_k x[k] * (1 + q[k, n] / 16)        (codes as floats: _mantissas)
        acc[n] += 16 * s[g, n] * (dots[n] - (1 + z[g, n] / 16) * sum_k x[k])

    which is sum_k x[k] * (q - z) * s. Each thread owns VEC packed columns, so a
    row is one load per thread and dots a chain of FMAs in its registers (a
    [BLOCK_K, BLOCK_N] tile summed with tl.sum costs a multiply-add tree instead);
    the loop is one flat pipelined walk (a loop per group would drain the pipeline
    at every group).

    Constexprs:
      GROUP_SIZE: rows per group, a power of two (a group over all of K is passed as
        any power of two >= K), so the group of a row is a shift.
      BLOCK_N: output columns per program: 8 * VEC * 32 * num_warps.
      BLOCK_K: rows per step; divides GROUP_SIZE, K and k_per_split (rows are not masked).
      VEC: int32s of a row each thread loads (1, 2 or 4: 4, 8 or 16 bytes).
      HAS_BIAS, IS_SPLIT: as in ``kvflow.kernels.gemv.split_k_epilogue``.
      NUM_STAGES: steps in flight (cp.async through shared memory); Triton pipelines
        a loop without tl.dot only when asked.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    packed_n = N // 8
    # The hint caps the vector width at VEC: Triton would otherwise give a thread 16
    # bytes of a row and spread the rest of the tile over fewer columns.
    offs_pn = tl.max_contiguous(pid_n * PACKED_N + tl.arange(0, PACKED_N), VEC)[None, :]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask_pn = offs_pn < packed_n  # [1, BN/8]
    mask_n = offs_n < N  # [1, BN]
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    # Row pointers walk down K (cheaper than a 64-bit product per row and step).
    q_ptrs = qweight_ptr + k_start.to(tl.int64) * packed_n + offs_pn
    acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        dots = tl.zeros((1, BLOCK_N), dtype=tl.float32)
        xsum = 0.0
        for row in tl.static_range(BLOCK_K):
            q = tl.load(q_ptrs + row * packed_n, mask=mask_pn, other=0)  # [1, BN/8]
            x = tl.load(x_ptr + k0 + row).to(tl.float32)
            dots += x * _mantissas(q, 1, PACKED_N)
            xsum += x
        group = k0 // GROUP_SIZE
        z = tl.load(qzeros_ptr + group * packed_n + offs_pn, mask=mask_pn, other=0)
        s = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += (16.0 * s) * (dots - _mantissas(z, 1, PACKED_N) * xsum)  # 1 + z/16 per column
        q_ptrs += BLOCK_K * packed_n
    split_k_epilogue(acc, offs_n, offs_n, mask_n, pid_s, N, out_ptr, bias_ptr, partial_ptr,
                     HAS_BIAS, IS_SPLIT)


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr,
    M, N, K, group_size, k_per_split, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over K range s, on tensor cores.

    Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), S)``.

    Constexprs:
      BLOCK_M: tokens per tile (>= 16, tl.dot's minimum).
      BLOCK_N: output columns per tile; a multiple of 8 (whole int32s of qweight).
      BLOCK_K: input features per step; divides ``group_size`` (or K is one group)
               and ``k_per_split``, so a step reads one row of qzeros and scales.
      HAS_BIAS, IS_SPLIT: as in ``kvflow.kernels.gemv.split_k_epilogue``.
      UPCAST:  CPU interpreter only: it multiplies bfloat16 tl.dot operands as raw
               bits, so the rounded operands are widened to float32 first (their
               products are exact there, as in the tensor cores).
    W is rounded to x's dtype before the dot, as the reference's weight is.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    packed_n = N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n, offs_pn, mask_n, mask_pn = _packed_columns(pid_n, N, BLOCK_N)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        q = tl.load(qweight_ptr + offs_k[:, None].to(tl.int64) * packed_n + offs_pn[None, :],
                    mask=mask_k[:, None] & mask_pn[None, :], other=0)  # [BK, BN/8]
        group = k0 // group_size
        z = tl.load(qzeros_ptr + group * packed_n + offs_pn, mask=mask_pn, other=0)  # [BN/8]
        s = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zs = tl.reshape(_exact_float(_codes(z[None, :], 1, PACKED_N)), (BLOCK_N,)) * s  # [BN]
        codes = _exact_float(_codes(q, BLOCK_K, PACKED_N))  # [BK, BN]
        w = (codes * s[None, :] - zs[None, :]).to(x_ptr.dtype.element_ty)  # [BK, BN]
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    offs = offs_m[:, None] * N + offs_n[None, :]  # into y [M, N]
    split_k_epilogue(acc, offs, offs_n[None, :], mask_m[:, None] & mask_n[None, :], pid_s,
                     M * N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)


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
    PACKED_N: tl.constexpr = BLOCK_N // 8
    packed_n = N // 8
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_n, offs_pn, mask_n, mask_pn = _packed_columns(pid_n, N, BLOCK_N)
    mask_kp = mask_k[:, None] & mask_pn[None, :]
    groups = offs_k // group_size  # [BK]
    q = tl.load(qweight_ptr + offs_k[:, None].to(tl.int64) * packed_n + offs_pn[None, :],
                mask=mask_kp, other=0)  # [BK, BN/8]
    z = tl.load(qzeros_ptr + groups[:, None] * packed_n + offs_pn[None, :],
                mask=mask_kp, other=0)  # [BK, BN/8]
    s = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :],
                mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
    codes = _codes(q, BLOCK_K, PACKED_N)
    zeros = _codes(z, BLOCK_K, PACKED_N)
    w = ((codes - zeros).to(tl.float32) * s.to(tl.float32)).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # [BN, BK]
    tl.store(out_ptrs, tl.trans(w), mask=mask_n[:, None] & mask_k[None, :])


GEMV_MAX_TOKENS = 1
"""Batches of this many tokens may run ``_awq_gemv_kernel`` by default; more take tl.dot."""


@dataclass(frozen=True)
class AWQGemmConfig:
    """Which fused kernel runs and its tile shape (see the kernels' docstrings)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    """Programs sharing one tile's K range (fewer when K does not split evenly)."""
    num_warps: int = 4
    num_stages: int = 3
    use_tensor_cores: bool = True
    """True: ``_awq_gemm_kernel`` (tl.dot); False: ``_awq_gemv_kernel`` (block_m = 1,
    block_n = 256 * num_warps * VEC with VEC in 1, 2, 4)."""


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: small, so tests exercise split-K
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _largest_block_dividing(num: int, block: int) -> int:
    while num % block:
        block //= 2
    return block


def _pow2_at_least(value: float) -> int:
    split = 1
    while split < value:
        split *= 2
    return split


@lru_cache(maxsize=4096)
def default_gemm_config(m: int, n: int, k: int, group_size: int,
                        device: torch.device) -> AWQGemmConfig:
    """The kernel and tile measured best on an H100 (benchmarks/kernels/bench_gemv.py,
    Llama-2-7B/3-8B linears, group 128, times per call inside CUDA graphs).

    One token, large weights (N * K >= 32M: gate_up, down, Llama-2's qkv): the
    CUDA-core GEMV, one warp of 256 columns, 32 rows a step, split until about 5.5
    programs per SM (Llama-3 gate_up 43.8 us, down 30.5 us against 81.9 / 45.3 for
    bf16 cuBLAS). Smaller weights (qkv, o of Llama-3): the tensor-core kernel,
    64 columns split 4 ways (19.7 / 15.2 us), which beat every GEMV tile there.
    2..16 tokens: the tensor-core kernel, 64 columns, split so that a split spans at
    most 2048 rows and the grid about two programs per SM. More tokens: square
    tiles, split while they are few.
    """
    sms = _num_sms(device)
    group_block = min(128, group_size) if group_size < k else 128
    steps = triton.cdiv(k, group_block)
    if m <= GEMV_MAX_TOKENS and n * k >= (32 << 20):
        block_n, block_k = 256, _largest_block_dividing(math.gcd(k, group_size), 32)
        split_k = _pow2_at_least(5.5 * sms / triton.cdiv(n, block_n))
        return AWQGemmConfig(1, block_n, block_k, min(split_k, k // (2 * block_k)),
                             num_warps=1, num_stages=3, use_tensor_cores=False)
    if m <= 16:
        split_k = max(_pow2_at_least(k / 2048), _pow2_at_least(1.9 * sms / triton.cdiv(n, 64)))
        return AWQGemmConfig(16, 64, group_block, min(split_k, steps), num_warps=4,
                             num_stages=3)
    if m <= 32:
        block_m, block_n, warps = 32, 128, 4
    elif m <= 64:
        block_m, block_n, warps = 64, 128, 4
    else:
        block_m, block_n, warps = 128, 128, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while tiles * split_k < 2 * sms and split_k * 2 <= steps:
        split_k *= 2
    return AWQGemmConfig(block_m, block_n, group_block, split_k, num_warps=warps)


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
             scales: torch.Tensor, config: Optional[AWQGemmConfig] = None,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16) @ dequant(qweight).T (+ bias [N]) -> [M, N] in x's dtype.

    Inputs are read only; every launch is graph-capturable (no host syncs).
    """
    num_in, num_out, group = _check_packed(qweight, qzeros, scales)
    assert x.dim() == 2 and x.shape[1] == num_in, (
        f"x must be [M, K={num_in}], got {tuple(x.shape)}")
    assert x.dtype in (torch.float16, torch.bfloat16), f"x must be fp16/bf16, got {x.dtype}"
    assert x.stride(1) == 1, "x's K dim must be contiguous"
    assert x.device == qweight.device
    if bias is not None:
        assert bias.shape == (num_out,) and bias.is_contiguous(), (
            f"bias must be a contiguous [{num_out}] tensor, got {tuple(bias.shape)}")
    num_tokens = x.shape[0]
    out = torch.empty(num_tokens, num_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    cfg = config or default_gemm_config(num_tokens, num_out, num_in, group, x.device)
    assert cfg.block_n % _PACK == 0 and cfg.block_k >= 8, cfg
    assert group % cfg.block_k == 0 or group == num_in, (
        f"block_k={cfg.block_k} must divide group_size={group} (or K={num_in} be one group)")
    per_split, num_splits = k_split(num_in, cfg.block_k, cfg.split_k)
    is_split = num_splits > 1
    partial = torch.empty(num_splits if is_split else 0, num_tokens, num_out,
                          dtype=torch.float32, device=x.device)
    has_bias = bias is not None and not is_split  # else sum_splits adds it
    bias_arg = bias if bias is not None else out
    if cfg.use_tensor_cores:
        assert min(cfg.block_m, cfg.block_n) >= 16, f"tl.dot needs 16x16 tiles: {cfg}"
        grid = (triton.cdiv(num_tokens, cfg.block_m), triton.cdiv(num_out, cfg.block_n),
                num_splits)
        _awq_gemm_kernel[grid](
            x, qweight, qzeros, scales, bias_arg, out, partial,
            num_tokens, num_out, num_in, group, per_split, x.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            HAS_BIAS=has_bias, IS_SPLIT=is_split, UPCAST=x.device.type != "cuda",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        assert num_tokens == 1 == cfg.block_m, f"the GEMV runs one token: M={num_tokens}, {cfg}"
        vec = cfg.block_n // (8 * 32 * cfg.num_warps)
        assert vec in (1, 2, 4) and cfg.block_n == 256 * cfg.num_warps * vec, (
            f"the GEMV needs block_n = 256 * num_warps * (1, 2 or 4): {cfg}")
        assert num_in % cfg.block_k == 0, f"block_k={cfg.block_k} must divide K={num_in}"
        assert group == num_in or group & (group - 1) == 0, f"group_size={group}: a power of 2"
        grid = (triton.cdiv(num_out, cfg.block_n), num_splits)
        _awq_gemv_kernel[grid](
            x, qweight, qzeros, scales, bias_arg, out, partial, num_out, num_in, per_split,
            GROUP_SIZE=triton.next_power_of_2(group), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            VEC=vec, HAS_BIAS=has_bias, IS_SPLIT=is_split, NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if is_split:
        sum_splits(partial, bias, out)
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
