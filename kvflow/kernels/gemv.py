"""Small-batch matmul y = x @ W.T (+ bias) for decode, in Triton.

Shape letters: M = tokens (1..64), K = input features, N = output features,
S = K splits. W is nn.Linear's [N, K], row-major; x is [M, K] with unit stride along K.

At a few tokens a step the matmul reads every weight once and does little
else, so it runs at the speed of the weight stream. Each program reads a
[BLOCK_N, BLOCK_K] tile of W per step, K contiguous (16-byte loads), with
NUM_STAGES tiles in flight::

         K ->                                 programs
    W  [BLOCK_N, BLOCK_K] ... (one tile)      grid = (cdiv(N, BLOCK_N), S)
    x  [BLOCK_M, BLOCK_K]                     program (n, s) covers rows
    y  [BLOCK_M, BLOCK_N] += x @ W_tile.T     n*BLOCK_N.. and K range s

``USE_DOT=False`` (one token) multiplies on the CUDA cores in float32;
``USE_DOT=True`` pads the tokens to BLOCK_M >= 16 and uses ``tl.dot`` (tensor
cores), which costs nothing in a memory-bound loop and keeps registers small
as M grows. When N / BLOCK_N programs are too few to cover the SMs, S programs
share a tile's K range (split-K) and store float32 partial sums
(``split_k_epilogue``, shared with the AWQ kernels) that ``sum_splits`` adds up
in split order: deterministic, and graph-capturable.

The tile per shape comes from ``default_gemv_config``, measured on an H100
(benchmarks/kernels/bench_gemv.py), not from run-time autotuning: start-up time
matters and a model has few shapes. Every launch is graph-capturable: no host
syncs, no data-dependent host logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels import pdl

MAX_TOKENS = 64
"""The kernel holds all tokens of a batch in one program (tl.dot tiles of up to 64 rows);
larger batches belong to cuBLAS. ``linear()`` decides per token count which one runs."""


@triton.jit
def split_k_epilogue(acc, offs, bias_offs, mask, pid_s, numel, out_ptr, bias_ptr, partial_ptr,
                     HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr):
    """Stores a program's float32 tile: y[offs] = acc (+ bias[bias_offs]) in y's dtype,
    or, with IS_SPLIT, the partial sum of split ``pid_s`` at partial[pid_s, offs]
    (float32 [S, numel]) for ``sum_splits`` to add up in split order.

    The split sums take a second launch: reducing them in the first, by the last
    program of each tile to count its arrival with an acq_rel atomic, measured
    2-7 us slower on the H100 (the atomics' round trips end every program).
    """
    if IS_SPLIT:
        tl.store(partial_ptr + pid_s * numel + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bias_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # the token count: no variant per batch size
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_IEEE: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
):
    """y[:, tile] over K range [s * k_per_split, (s + 1) * k_per_split) of program (n, s).

    Grid: ``(cdiv(N, BLOCK_N), S)`` with ``S = cdiv(K, k_per_split)``.

    Constexprs:
      BLOCK_M: power of two >= M (>= 16 with USE_DOT); padding rows are masked.
      BLOCK_N: weight rows (outputs) per program.
      BLOCK_K: input features per step; ``k_per_split`` is a multiple of it.
      USE_DOT: tensor cores (``tl.dot``) instead of float32 CUDA-core FMAs.
      HAS_BIAS, IS_SPLIT: as in ``split_k_epilogue``.
      DOT_IEEE: multiply in float32 without tf32 rounding: for float32 inputs, and in
              the CPU interpreter, which multiplies bfloat16 ``tl.dot`` operands as
              raw bits (widening first keeps the products exact).
      NUM_STAGES: W tiles in flight (cp.async through shared memory); without a
              tl.dot in the loop Triton pipelines it only when asked.
      USE_PDL: launched with ``kvflow.kernels.pdl.launch_options``.
    """
    pdl.wait_for_predecessor(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
    else:
        tl.static_assert(BLOCK_M == 1, "the CUDA-core path runs one token")
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed over K at the end
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)  # [BN, BK]
        if USE_DOT:
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)  # [BM, BK]
            if DOT_IEEE:
                acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)  # [BN, BM]
        else:
            x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0)  # [BK]: the one token
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if USE_DOT:
        acc = tl.trans(acc)  # [BM, BN]
    else:
        acc = tl.sum(acc, axis=1)[None, :]  # [1, BN]
    offs = offs_m[:, None] * N + offs_n[None, :]  # into y [M, N]
    split_k_epilogue(acc, offs, offs_n[None, :], mask_m[:, None] & mask_n[None, :], pid_s,
                     M * N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)


@triton.jit(do_not_specialize=["numel", "num_splits"])
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, numel, N, num_splits,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[i] = sum over s of partial[s, i] (+ bias[i % N]), added in split order.

    Grid: ``(cdiv(numel, BLOCK),)``; partial is float32 [S, numel] contiguous, out
    [numel] contiguous (numel = M * N). ``num_splits`` is a run-time value, so one
    compiled kernel serves every S. USE_PDL: launched with ``pdl.launch_options``.
    """
    pdl.wait_for_predecessor(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(num_splits):
        acc += tl.load(partial_ptr + split * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemvConfig:
    """Tile shape and launch settings of ``_gemv_kernel`` (see its docstring)."""

    block_n: int
    block_k: int
    split_k: int = 1
    """Programs sharing one tile's K range (capped so that none gets an empty range)."""
    use_dot: bool = False
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=4096)
def default_gemv_config(m: int, n: int, k: int, dtype: torch.dtype,
                        device: torch.device) -> GemvConfig:
    """The tile measured best on an H100 (benchmarks/kernels/bench_gemv.py, Llama-2/3 shapes).

    One token: the CUDA-core path, 8 rows x 1024 features a step, no split: with
    rows this narrow N / 8 >= 512 programs already cover the 132 SMs, and a split
    only adds the partial-sum traffic (qkv 19.1 us at 1 split vs 21.3 at 2). Within
    2% of the best of 28 tiles on every shape. More tokens: tl.dot on 64 x 256
    tiles; split 2 only when K is long and N small (down: 42.9 vs 45.8 us).
    """
    del dtype, device  # one table serves fp16/bf16 (float32 runs the same tiles)
    if m == 1:
        return GemvConfig(block_n=8, block_k=1024, split_k=1, num_warps=4, num_stages=3)
    split_k = 2 if k >= 8192 and n <= 8192 else 1
    return GemvConfig(block_n=64, block_k=256, split_k=split_k, use_dot=True, num_warps=4,
                      num_stages=3)


def k_split(num_in: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(features per split, number of splits): about ``split_k`` ranges of whole
    BLOCK_K steps, fewer when K has fewer steps than that."""
    steps = triton.cdiv(num_in, block_k)
    per_split = triton.cdiv(steps, min(split_k, steps)) * block_k
    return per_split, triton.cdiv(num_in, per_split)


def _block_m(num_tokens: int, use_dot: bool) -> int:
    return max(16 if use_dot else 1, triton.next_power_of_2(num_tokens))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config: Optional[GemvConfig] = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype; inputs are read only.

    Same result as ``F.linear`` up to float32 summation order (one rounding at the end).
    """
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (
        f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    assert x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32), (
        f"x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    assert x.stride(1) == 1 and weight.stride(1) == 1, "x and weight must be contiguous along K"
    assert x.shape[0] <= MAX_TOKENS, f"gemv holds at most {MAX_TOKENS} tokens, got {x.shape[0]}"
    assert x.device == weight.device
    num_tokens, num_in = x.shape
    num_out = weight.shape[0]
    if bias is not None:
        assert bias.shape == (num_out,) and bias.is_contiguous() and bias.device == x.device, (
            f"bias must be a contiguous [{num_out}] tensor, got {tuple(bias.shape)}")
    out = torch.empty(num_tokens, num_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    cfg = config or default_gemv_config(num_tokens, num_out, num_in, x.dtype, x.device)
    assert cfg.use_dot or num_tokens == 1, f"the CUDA-core path runs one token: {cfg}"
    k_per_split, num_splits = k_split(num_in, cfg.block_k, cfg.split_k)
    is_split = num_splits > 1
    partial = torch.empty(num_splits if is_split else 0, num_tokens, num_out,
                          dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_out, cfg.block_n), num_splits)
    options = pdl.launch_options(x.device)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else out, out, partial,
        num_tokens, num_out, num_in, k_per_split, x.stride(0), weight.stride(0),
        BLOCK_M=_block_m(num_tokens, cfg.use_dot), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        USE_DOT=cfg.use_dot, HAS_BIAS=bias is not None and not is_split, IS_SPLIT=is_split,
        DOT_IEEE=x.device.type != "cuda" or x.dtype == torch.float32,
        NUM_STAGES=cfg.num_stages, USE_PDL=bool(options), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **options)
    if is_split:
        sum_splits(partial, bias, out)
    return out


def sum_splits(partial: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """out [M, N] = partial [S, M, N] summed over S in order (+ bias [N]); writes out."""
    assert partial.dtype == torch.float32 and partial.is_contiguous() and out.is_contiguous()
    assert partial.shape[1:] == out.shape, (tuple(partial.shape), tuple(out.shape))
    numel, block = out.numel(), 1024
    options = pdl.launch_options(out.device)
    _sum_splits_kernel[(triton.cdiv(numel, block),)](
        partial, bias if bias is not None else out, out, numel, out.shape[-1], partial.shape[0],
        HAS_BIAS=bias is not None, BLOCK=block, USE_PDL=bool(options), num_warps=4, **options)
