"""One-token AWQ int4 GEMV straight over AutoAWQ's layout, x reused across a thread's words.

Shape letters: K = input features, N = output features, G = group size, S = K splits,
R = rows (inputs) a warp takes per step, V = warps a program (each its own rows),
T = int32 words a thread holds per row. The layout is the checkpoint's own
(``kvflow.quantization.awq_format``): ``qweight`` int32 [K, N/8] (eight output
columns a word) and ``qzeros`` int32 [K/G, N/8] are read as published; the scales
fp16 [K/G, N] as a nibble-major copy (``nibble_major_scales``, 1/64 of the codes'
bytes), so that a thread's words have contiguous scales. The codes are not repacked.

Why a kernel over this layout: at one token the K-packed GEMV (``awq_gemv``) pays for
x, not for the weights. A word there is eight inputs of one column, so each 4-byte
word needs 16 bytes of x and a thread's own preprocessing of them; Nsight Compute
found L1/TEX 74-79% busy while DRAM sat at 40-45% (benchmarks/RESULTS.md, sixth
session). Here a word is eight *columns* of one input: one x value serves all T words
a thread holds on that row (8T codes), and the partial sums of a column never leave
its thread until the end. A thread owns T consecutive words (16-byte loads at T = 4)
and walks down K::

    program (n, s): words [n*32T, (n+1)*32T) of every row in K range s
    step:    warp v takes rows k0 + v*R + r, r = 0..R-1, one [1, V, 32, T] load each
    thread:  a_p[v, lane, t] += x[k] * f_p(word)        (p = nibble 0..7, one FMA)

A code becomes a float without an int->float conversion: shifting the word puts two
nibbles at mantissa bits 15..18 and 19..22, and one and-or per code makes the float
1 + q/256 (class B) or 1 + q/16 (class A) (``kvflow.kernels.awq_gemv._as_float``).
Four shifts, eight and-ors and eight FMAs a word: ~20 instructions for 8 weights.

Per chunk of C inputs inside one group (scale s, zero z of the column), with
X = sum of x over the chunk's rows and D = 16 or 256 (the nibble's class)::

    sum_k x_k (q_k - z) s = (s D) * a_p - s (D + z) * X      (a_p = sum_k x_k (1 + q_k / D))

so scales and zeros are read once a chunk, not once a weight. Warps add up their
rows at the end (once a program); with S > 1 the programs store float32 partial sums
that ``kvflow.kernels.gemv.sum_splits`` adds in split order (deterministic). Every
launch is graph-capturable: no host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels import pdl
from kvflow.kernels.activation import silu_times
from kvflow.kernels.awq_gemv import _MASK_A, _MASK_B, _ONE_BITS, _as_float
from kvflow.kernels.gemv import split_k_epilogue, sum_splits
from kvflow.quantization import awq_format

_D_A = tl.constexpr(16.0)  # class A code: 1 + q/16
_D_B = tl.constexpr(256.0)  # class B code: 1 + q/256


@triton.jit
def _load(ptrs, mask, EVEN_N: tl.constexpr):
    """ptrs' values; with EVEN_N no mask (every column exists), else 0 past N."""
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _input(ptrs, K, GATED: tl.constexpr):
    """x at ``ptrs`` in float32; GATED: silu(gate) * up with up K values further,
    rounded as the activation kernel rounds it (``kvflow.kernels.activation.silu_times``)."""
    if GATED:
        gate = tl.load(ptrs).to(tl.float32)
        up = tl.load(ptrs + K).to(tl.float32)
        return silu_times(gate, up, ptrs.dtype.element_ty)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def _chunk_terms(a, sc_base, offs_w, zw, x_sum, NIBBLE: tl.constexpr, D: tl.constexpr,
                 words_per_row, mask, EVEN_N: tl.constexpr):
    """Nibble NIBBLE's chunk sums ``a`` made exact: (s D) a - s (D + z) X."""
    scale = _load(sc_base + NIBBLE * words_per_row + offs_w, mask, EVEN_N).to(tl.float32)
    zero = ((zw >> (4 * NIBBLE)) & 0xF).to(tl.float32)
    return (scale * D) * a - (scale * (D + zero)) * x_sum


@triton.jit
def _awq_gemv_rows_kernel(
    x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr, partial_ptr,
    N, K, words_per_row, k_per_split, group_size, one_bits,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, WARPS: tl.constexpr, WORDS: tl.constexpr,
    EVEN_N: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """y[0, tile] over K range [s * k_per_split, + k_per_split) of program (n, s).

    Grid: ``(cdiv(N / 8, 32 * WORDS), S)``. ``sc_ptr`` is the scales by nibble
    (``nibble_major_scales``): fp16 [K/G, 8, N/8].

    Constexprs:
      CHUNK: inputs between two reads of the scales; divides the group size and
        k_per_split, and is a multiple of ROWS * WARPS.
      ROWS: rows a warp takes per step (x values a thread holds).
      WARPS: warps a program (= num_warps), each on its own rows of a step.
      WORDS: int32 words a thread holds per row (T; 4 = 16-byte loads).
      EVEN_N: N / 8 is a multiple of 32 T: no column masks (nor the zeroing they cost).
      GATED: x_ptr is the MLP's [gate | up] row (2K values) and the input is
        silu(gate) * up, rounded as ``kvflow.kernels.activation`` rounds it (so the
        activation kernel's launch and its round trip through memory go away).
      HAS_BIAS, IS_SPLIT: as in ``kvflow.kernels.gemv.split_k_epilogue``.
      USE_PDL: launched with ``kvflow.kernels.pdl.launch_options``.

    Layout: every tensor is [1, V, 32, T] in the weight tile's layout (T words in a
    thread, lanes along the row, warps along V): the sums over R stay in a thread
    (``keep_dims``), and the loads of the epilogue (zeros, scales by nibble, both T
    contiguous words) get that same layout, so nothing crosses threads before the end.
    Pointers are a scalar base plus a loop-invariant offset tensor, so that the x load
    (fewer values than threads) is re-made in the tile's layout instead of shuffled.
    """
    pdl.wait_for_predecessor(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    STEP: tl.constexpr = ROWS * WARPS
    offs_v = tl.arange(0, WARPS)[None, :, None, None]
    word = (pid_n * (32 * WORDS) + tl.arange(0, 32)[None, None, :, None] * WORDS
            + tl.arange(0, WORDS)[None, None, None, :])  # [1, 1, 32, T]
    x_offs = offs_v * ROWS  # [1, V, 1, 1]: warp v's first row in a step
    w_offs = x_offs * words_per_row + word  # [1, V, 32, T]
    e_offs = word + offs_v * 0  # [1, V, 32, T]: the same words for every warp
    e_mask = None if EVEN_N else e_offs < words_per_row
    k_start = pid_s * k_per_split
    num_chunks = (tl.minimum(K, k_start + k_per_split) - k_start) // CHUNK
    y0 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    y1 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    y2 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    y3 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    y4 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    y5 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    y6 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    y7 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
    for c in range(0, num_chunks):
        k_chunk = k_start + c * CHUNK
        a0 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        a1 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        a2 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        a3 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        a4 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        a5 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        a6 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        a7 = tl.zeros((1, WARPS, 32, WORDS), dtype=tl.float32)
        # X of each warp's rows, made from a0 so that it shares the tile's layout (one
        # load of x a row serves both it and the FMAs).
        x_sum = tl.sum(tl.sum(a0, axis=3, keep_dims=True), axis=2, keep_dims=True)
        w_base = qw_ptr + k_chunk.to(tl.int64) * words_per_row  # scalar: row k_chunk
        x_base = x_ptr + k_chunk
        for i in range(0, CHUNK // STEP):
            # Row by row (unrolled), so that each code costs one FMA into its column's sum.
            for r in tl.static_range(ROWS):
                p = _load(w_base + (w_offs + r * words_per_row), e_mask, EVEN_N)
                p = p.to(tl.uint32, bitcast=True)  # [1, V, 32, T]
                xv = _input(x_base + (x_offs + r), K, GATED)  # [1, V, 1, 1] float32
                x_sum += xv
                # Nibble i sits at bits 4i..4i+3; each shift brings nibbles 2j (class B,
                # bits 15..18) and 2j + 1 (class A, bits 19..22) into place.
                t = p << 15
                a0 += xv * _as_float(t, _MASK_B, one_bits)
                a1 += xv * _as_float(t, _MASK_A, one_bits)
                t = p << 7
                a2 += xv * _as_float(t, _MASK_B, one_bits)
                a3 += xv * _as_float(t, _MASK_A, one_bits)
                t = p >> 1
                a4 += xv * _as_float(t, _MASK_B, one_bits)
                a5 += xv * _as_float(t, _MASK_A, one_bits)
                t = p >> 9
                a6 += xv * _as_float(t, _MASK_B, one_bits)
                a7 += xv * _as_float(t, _MASK_A, one_bits)
            w_base += STEP * words_per_row
            x_base += STEP
        # The chunk lies in one group: its zeros (a word per word) and scales by nibble.
        group = (k_chunk // group_size).to(tl.int64)
        zw = _load(qz_ptr + group * words_per_row + e_offs, e_mask, EVEN_N)
        zw = zw.to(tl.uint32, bitcast=True)  # [1, V, 32, T]
        sc_base = sc_ptr + group * (8 * words_per_row)
        y0 += _chunk_terms(a0, sc_base, e_offs, zw, x_sum, 0, _D_B, words_per_row, e_mask,
                              EVEN_N)
        y1 += _chunk_terms(a1, sc_base, e_offs, zw, x_sum, 1, _D_A, words_per_row, e_mask,
                              EVEN_N)
        y2 += _chunk_terms(a2, sc_base, e_offs, zw, x_sum, 2, _D_B, words_per_row, e_mask,
                              EVEN_N)
        y3 += _chunk_terms(a3, sc_base, e_offs, zw, x_sum, 3, _D_A, words_per_row, e_mask,
                              EVEN_N)
        y4 += _chunk_terms(a4, sc_base, e_offs, zw, x_sum, 4, _D_B, words_per_row, e_mask,
                              EVEN_N)
        y5 += _chunk_terms(a5, sc_base, e_offs, zw, x_sum, 5, _D_A, words_per_row, e_mask,
                              EVEN_N)
        y6 += _chunk_terms(a6, sc_base, e_offs, zw, x_sum, 6, _D_B, words_per_row, e_mask,
                              EVEN_N)
        y7 += _chunk_terms(a7, sc_base, e_offs, zw, x_sum, 7, _D_A, words_per_row, e_mask,
                              EVEN_N)
    # Warps add up their rows; nibble i is column 8w + AWQ_ORDER[i].
    col = tl.reshape(word, (32, WORDS)) * 8
    out_mask = col < N
    _store(y0, col + 0, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)
    _store(y1, col + 2, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)
    _store(y2, col + 4, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)
    _store(y3, col + 6, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)
    _store(y4, col + 1, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)
    _store(y5, col + 3, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)
    _store(y6, col + 5, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)
    _store(y7, col + 7, out_mask, pid_s, N, out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)


@triton.jit
def _store(y, cols, mask, pid_s, N, out_ptr, bias_ptr, partial_ptr,
           HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr):
    """Sums a nibble's [1, V, 32, T] over the warps and stores it at its columns."""
    y = tl.reshape(tl.sum(y, axis=1), (32, y.shape[3]))
    split_k_epilogue(y, cols, cols, mask, pid_s, N, out_ptr, bias_ptr, partial_ptr,
                     HAS_BIAS, IS_SPLIT)


def nibble_major_scales(scales: torch.Tensor) -> torch.Tensor:
    """AWQ scales fp16 [K/G, N] -> [K/G, 8, N/8], [g, i, w] = scales[g, 8w + AWQ_ORDER[i]]:
    the scale of nibble i of word w, so that a thread's T words are T contiguous halves."""
    groups, num_out = scales.shape
    order = torch.tensor(awq_format.AWQ_ORDER, device=scales.device)
    by_word = scales.reshape(groups, num_out // 8, 8).index_select(2, order)  # [K/G, N/8, 8]
    return by_word.transpose(1, 2).contiguous()


@dataclass(frozen=True)
class AWQGemvRowsConfig:
    """Tile and launch settings of ``_awq_gemv_rows_kernel`` (see its docstring)."""

    words: int = 4
    """int32 words a thread holds per row (T): a program covers 256 T output columns."""
    rows: int = 8
    """Rows a warp takes per step (R)."""
    warps: int = 4
    """Warps a program (V), each on its own rows."""
    split_k: int = 1
    """K ranges (S): programs sharing one column tile."""
    chunk: int = 128
    """Inputs between reads of the scales (C); capped by the group size."""


@lru_cache(maxsize=4096)
def default_rows_config(n: int, k: int, group_size: int) -> AWQGemvRowsConfig:
    """A first tile: enough programs (column tiles x K splits) for ~4 a streaming
    multiprocessor on an H100 (132), each split at least 1024 inputs."""
    tiles = triton.cdiv(n // 8, 32 * 4)
    split = 1
    while tiles * split < 4 * 132 and k // (split * 2) >= 1024:
        split *= 2
    return AWQGemvRowsConfig(words=4, rows=8, warps=4, split_k=split, chunk=128)


def _chunk_for(group_size: int, chunk: int, step: int) -> int:
    """The largest power-of-two fraction of ``chunk`` (>= step) dividing the group."""
    chunk = min(chunk, group_size)
    while group_size % chunk and chunk > step:
        chunk //= 2
    return chunk


def rows_unsupported_reason(num_in: int, num_out: int, group_size: int,
                            config: AWQGemvRowsConfig = AWQGemvRowsConfig()) -> Optional[str]:
    """Why the kernel cannot run a [N, K] layer with these settings, or None."""
    step = config.rows * config.warps
    chunk = _chunk_for(group_size, config.chunk, step)
    if group_size % chunk or chunk % step or num_in % chunk:
        return (f"K={num_in} with group {group_size} has no chunk of whole {step}-row "
                "steps inside one group")
    if num_out % 8:
        return f"N={num_out} is not a multiple of 8"
    return None


def awq_gemv_rows(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                  scales_by_nibble: torch.Tensor, group_size: int,
                  bias: Optional[torch.Tensor] = None,
                  config: Optional[AWQGemvRowsConfig] = None,
                  gated: bool = False) -> torch.Tensor:
    """x [1, K] (fp16/bf16) @ W.T (+ bias [N]) -> [1, N] in x's dtype, W the AWQ layer
    (``qweight`` [K, N/8], ``qzeros`` [K/G, N/8], and its scales as
    ``nibble_major_scales`` makes them, fp16 [K/G, 8, N/8]); read only. ``group_size``
    is G (K for one group). ``gated``: x is [1, 2K] = [gate | up] and the input is
    silu(gate) * up (``kvflow.kernels.activation.silu_and_mul``, fused)."""
    assert x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.float16, torch.bfloat16), (
        f"x must be [1, K] fp16/bf16, got {x.dtype} {tuple(x.shape)}")
    num_in = x.shape[1] // 2 if gated else x.shape[1]
    assert x.stride(1) == 1, "x's K dim must be contiguous"
    assert qweight.dtype == torch.int32 and qweight.is_contiguous() and qweight.shape[0] == num_in
    words_per_row = qweight.shape[1]
    num_out = words_per_row * 8
    assert qzeros.shape == (num_in // group_size, words_per_row) and qzeros.is_contiguous()
    scales = scales_by_nibble
    assert scales.shape == (num_in // group_size, 8, words_per_row) and scales.is_contiguous()
    assert scales.dtype == torch.float16
    if bias is not None:
        assert bias.shape == (num_out,) and bias.is_contiguous()
    cfg = config or default_rows_config(num_out, num_in, group_size)
    reason = rows_unsupported_reason(num_in, num_out, group_size, cfg)
    assert reason is None, reason
    step = cfg.rows * cfg.warps
    chunk = _chunk_for(group_size, cfg.chunk, step)
    chunks = num_in // chunk
    per_split = triton.cdiv(chunks, min(cfg.split_k, chunks)) * chunk
    num_splits = triton.cdiv(num_in, per_split)
    out = torch.empty(1, num_out, dtype=x.dtype, device=x.device)
    is_split = num_splits > 1
    partial = torch.empty(num_splits if is_split else 0, 1, num_out, dtype=torch.float32,
                          device=x.device)
    grid = (triton.cdiv(words_per_row, 32 * cfg.words), num_splits)
    options = pdl.launch_options(x.device)
    _awq_gemv_rows_kernel[grid](
        x, qweight, qzeros, scales, bias if bias is not None else out, out, partial,
        num_out, num_in, words_per_row, per_split, group_size, _ONE_BITS,
        CHUNK=chunk, ROWS=cfg.rows, WARPS=cfg.warps, WORDS=cfg.words,
        EVEN_N=words_per_row % (32 * cfg.words) == 0, GATED=gated,
        HAS_BIAS=bias is not None and not is_split, IS_SPLIT=is_split,
        USE_PDL=bool(options), num_warps=cfg.warps, num_stages=1, **options)
    if is_split:
        sum_splits(partial, bias, out)
    return out
