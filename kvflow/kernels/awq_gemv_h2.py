"""AWQ int4 GEMV for one float16 token over the half2 layout (Triton, fp16x2 CUDA-core math).

Shape letters: K = input features, N = output features, G = group size, R = BLOCK_N
rows (outputs) of a program, BB = 16-byte word blocks a row per step (32 inputs each),
t = word of a block (0..3), j = nibble pair of a word (0..3), S = K splits. The layout
(``words`` int32 [N, K/8], ``scales_zeros`` int32 [N, K/G]) and its plain-torch
reference (``h2_linear_ref``) live in ``kvflow.quantization.awq_h2pack``.

At one token an int4 GEMV is a stream of weight bytes short enough that the
instructions per weight decide whether it keeps up (``awq_gemv``'s float32 path: ~3.3
a weight). Here a pair of weights costs one shift (three pairs in four), one and-or
(two codes -> half2 1 + q/64), one ``sub.f16x2`` (-> (q - z)/64, exact) and one
``fma.f16x2`` with the matching pair of x: ~2 instructions a weight. A step::

    words  [R, BB, 4]  int32, t contiguous (16-byte loads)
    x      [1, BB, 4]  int32 pairs, one 16-byte load per j (awq_h2pack's order)
    h      [R, BB, 4]  half2 += (q - z)/64 * x      4 pairs (j) per word, fp16
    acc    [R, BB]     fp32 += 64 s * (sum over t and both halves of h)

The fp16 sums are short (16 products a half before they go to float32: relative error
~1e-3 of a block's sum, like an fp16 matmul's) and small (a product is at most 15/64 of
|x|: a block overflows fp16 only past |x| ~ 17,000), and every block of 32 inputs lies in
one group, so one scale multiplies it. When N / R programs are too few for the SMs, S
programs split K and store float32 partials that ``kvflow.kernels.gemv.sum_splits``
adds in split order (deterministic). Graph-capturable: no host syncs.

Under Triton's CPU interpreter (``EMULATE``) the three half2 instructions are computed
from the two halves in float32 and rounded to fp16, which is what the hardware does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels import pdl
from kvflow.kernels.gemv import k_split, split_k_epilogue, sum_splits


_PAIR_MASK = 0x00F000F0  # a run-time argument (see the kernel's docstring)


@triton.jit
def _halves(a):
    """int32 holding a half2 -> (low, high) as float32."""
    low = (a & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    high = (a >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return low.to(tl.float32), high.to(tl.float32)


@triton.jit
def _join(low, high):
    """(low, high) float32 -> int32 holding the half2 of both rounded to fp16."""
    low_bits = low.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high_bits = high.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return low_bits | (high_bits << 16)


@triton.jit
def _sub2(a, b, EMULATE: tl.constexpr):
    """a - b on half2 bit patterns (int32)."""
    if EMULATE:
        a_lo, a_hi = _halves(a)
        b_lo, b_hi = _halves(b)
        return _join(a_lo - b_lo, a_hi - b_hi)
    else:
        return tl.inline_asm_elementwise("sub.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _fma2(a, b, c, EMULATE: tl.constexpr):
    """a * b + c on half2 bit patterns (int32), one rounding."""
    if EMULATE:
        a_lo, a_hi = _halves(a)
        b_lo, b_hi = _halves(b)
        c_lo, c_hi = _halves(c)
        return _join(a_lo * b_lo + c_lo, a_hi * b_hi + c_hi)
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _add2_asm(a, b):
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _add2_emulated(a, b):
    a_lo, a_hi = _halves(a)
    b_lo, b_hi = _halves(b)
    return _join(a_lo + b_lo, a_hi + b_hi)


@triton.jit
def _awq_gemv_h2_kernel(
    x_ptr, w_ptr, sz_ptr, bias_ptr, out_ptr, partial_ptr,
    N, K, words_per_row, k_per_split, words_per_split, pairs_per_split, groups_per_row,
    pair_mask, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, GROUP: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr, EMULATE: tl.constexpr,
):
    """y[0, tile] over K range [s * k_per_split, + k_per_split) of program (n, s).

    Grid: ``(cdiv(N, BLOCK_N), S)``. ``x_ptr`` is the token as int32 pairs [K/2].
    ``pair_mask`` is 0x00F000F0 at run time: as a constant, ptxas would spend the and-or's
    one immediate slot on 0x3C003C00 and re-materialize the mask for every pair.

    Constexprs:
      BLOCK_N: rows of W (outputs) per program.
      BLOCKS: 16-byte word blocks (32 inputs) per row and step; 32 * BLOCKS divides
        k_per_split (K is not masked).
      GROUP: inputs per scale (a multiple of 32, or K for one group).
      EVEN_N: BLOCK_N divides N (no row masks).
      HAS_BIAS, IS_SPLIT: as in ``kvflow.kernels.gemv.split_k_epilogue``.
      NUM_STAGES: steps in flight (Triton pipelines a loop without tl.dot only when asked).
      USE_PDL: launched with ``kvflow.kernels.pdl.launch_options``.
      EMULATE: the CPU interpreter's stand-ins for the half2 instructions.
    """
    pdl.wait_for_predecessor(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    BLOCK_K: tl.constexpr = 32 * BLOCKS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]  # [R, 1, 1]
    offs_b = tl.arange(0, BLOCKS)[None, :, None]  # [1, BB, 1]
    offs_t = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]
    mask_n = offs_n < N
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    # words_per_split = k_per_split / 8 and pairs_per_split = k_per_split / 2 come as
    # arguments so that Triton sees them divisible by 16 and loads 16 bytes a thread.
    w_ptrs = (w_ptr + offs_n.to(tl.int64) * words_per_row + pid_s * words_per_split
              + offs_b * 4 + offs_t)  # [R, BB, 4]
    x_ptrs = x_ptr + pid_s * pairs_per_split + offs_b * 16 + offs_t  # [1, BB, 4]: pair j at +4j
    sz_rows = sz_ptr + offs_n.to(tl.int64) * groups_per_row  # [R, 1, 1]
    acc = tl.zeros((BLOCK_N, BLOCKS, 1), dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_N:
            w = tl.load(w_ptrs)  # [R, BB, 4]
        else:
            w = tl.load(w_ptrs, mask=mask_n, other=0)
        group = (k0 + offs_b * 32) // GROUP  # [1, BB, 1]: non-negative
        if EVEN_N:
            sz = tl.load(sz_rows + group)  # [R, BB, 1]: half2 (s, 1 + z/64)
        else:
            sz = tl.load(sz_rows + group, mask=mask_n, other=0)
        zz = (sz & -65536) | ((sz >> 16) & 0xFFFF)  # half2 (1 + z/64, 1 + z/64)
        h = tl.zeros((BLOCK_N, BLOCKS, 4), dtype=tl.int32)  # half2 zeros
        for j in tl.static_range(4):
            xj = tl.load(x_ptrs + 4 * j)  # [1, BB, 4]
            # nibbles of pair j to mantissa bits 4..7: half2 (1 + q/64, 1 + q'/64)
            if j == 0:
                v = ((w << 4) & pair_mask) | 0x3C003C00
            else:
                v = ((w >> (4 * j - 4)) & pair_mask) | 0x3C003C00
            h = _fma2(_sub2(v, zz, EMULATE), xj, h, EMULATE)
        if EMULATE:
            hb = tl.reduce(h, 2, _add2_emulated, keep_dims=True)  # [R, BB, 1]
        else:
            hb = tl.reduce(h, 2, _add2_asm, keep_dims=True)
        lo, hi = _halves(hb)
        scale, _ = _halves(sz)
        acc += (lo + hi) * (scale * 64.0)
        w_ptrs += BLOCK_K // 8
        x_ptrs += BLOCK_K // 2
    y = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # [1, R]
    offs_n2 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    split_k_epilogue(y, offs_n2, offs_n2, offs_n2 < N, pid_s, N,
                     out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)


@dataclass(frozen=True)
class H2GemvConfig:
    """Tile and launch settings of ``_awq_gemv_h2_kernel`` (see its docstring)."""

    block_n: int
    blocks: int
    """16-byte word blocks (32 inputs) per row and step."""
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=4096)
def default_config(n: int, k: int) -> H2GemvConfig:
    """A first tile (16 rows x 256 inputs a step; split 2 where N is small against K)."""
    split_k = 2 if n * 2 < k else 1
    return H2GemvConfig(block_n=16, blocks=8, split_k=split_k, num_warps=4, num_stages=3)


def _blocks_for(num_in: int, group: int, blocks: int) -> int:
    """The largest power-of-two fraction of ``blocks`` whose steps divide K (each block
    finds its own group, so a step may cross groups)."""
    del group
    while blocks > 1 and num_in % (32 * blocks):
        blocks //= 2
    return blocks


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def awq_gemv_h2(x: torch.Tensor, words: torch.Tensor, scales_zeros: torch.Tensor,
                group_size: int, bias: Optional[torch.Tensor] = None,
                config: Optional[H2GemvConfig] = None) -> torch.Tensor:
    """x [1, K] float16 @ W.T (+ bias [N]) -> [1, N] float16.

    ``words``/``scales_zeros``/``group_size`` are an ``awq_h2pack.H2Weight``'s fields;
    inputs are read only.
    """
    assert x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.float16, (
        f"x must be [1, K] float16, got {x.dtype} {tuple(x.shape)}")
    num_in = x.shape[1]
    assert x.is_contiguous(), "x must be contiguous"
    assert words.dtype == torch.int32 and words.is_contiguous() and words.dim() == 2, (
        f"words must be contiguous int32 [N, K/8], got {words.dtype} {tuple(words.shape)}")
    num_out = words.shape[0]
    assert words.shape[1] * 8 == num_in, f"words {tuple(words.shape)} vs K={num_in}"
    assert num_in % 32 == 0 and group_size % 32 == 0 and num_in % group_size == 0, (
        f"K={num_in} and group_size={group_size} must be multiples of 32, G dividing K")
    assert scales_zeros.shape == (num_out, num_in // group_size), (
        f"scales_zeros must be [N, K/G] = [{num_out}, {num_in // group_size}], "
        f"got {tuple(scales_zeros.shape)}")
    assert scales_zeros.dtype == torch.int32 and scales_zeros.is_contiguous()
    assert x.device == words.device == scales_zeros.device
    if bias is not None:
        assert bias.shape == (num_out,) and bias.is_contiguous(), (
            f"bias must be a contiguous [{num_out}] tensor, got {tuple(bias.shape)}")
    cfg = config or default_config(num_out, num_in)
    assert triton.next_power_of_2(cfg.block_n) == cfg.block_n and (
        triton.next_power_of_2(cfg.blocks) == cfg.blocks), f"powers of two only: {cfg}"
    blocks = _blocks_for(num_in, group_size, cfg.blocks)
    block_k = 32 * blocks
    out = torch.empty(1, num_out, dtype=x.dtype, device=x.device)
    per_split, num_splits = k_split(num_in, block_k, cfg.split_k)
    is_split = num_splits > 1
    partial = torch.empty(num_splits if is_split else 0, 1, num_out,
                          dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_out, cfg.block_n), num_splits)
    options = pdl.launch_options(x.device)
    _awq_gemv_h2_kernel[grid](
        x.view(torch.int32), words, scales_zeros, bias if bias is not None else out, out,
        partial, num_out, num_in, num_in // 8, per_split, per_split // 8, per_split // 2,
        num_in // group_size, _PAIR_MASK, BLOCK_N=cfg.block_n, BLOCKS=blocks, GROUP=group_size,
        EVEN_N=num_out % cfg.block_n == 0,
        HAS_BIAS=bias is not None and not is_split, IS_SPLIT=is_split,
        NUM_STAGES=cfg.num_stages, USE_PDL=bool(options), EMULATE=_interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options)
    if is_split:
        sum_splits(partial, bias, out)
    return out
