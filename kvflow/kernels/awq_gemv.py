"""AWQ int4 GEMV for 1..4 tokens over the K-packed layout (Triton, CUDA cores).

Shape letters: M = tokens (1..4), K = input features, N = output features, G = group
size, C = groups (chunks) per step, W = int32 words per chunk, S = K splits. The
layout (``words`` int32 [N, K/8], ``scales_zeros`` fp16 [N, K/G, 2]) and its
plain-torch reference (``kpack_linear_ref``) live in ``kvflow.quantization.awq_kpack``.

At a few tokens the matmul is a stream of weight bytes; in int4 the stream is short
enough that the instructions per weight, not the bytes, set the pace of a naive
kernel. So a weight costs three instructions here: a shift shared by two codes, a
mask-and-or that makes the float 1 + q/16 (or 1 + q/256) straight from the bits, and
one FMA per token. Each program owns BLOCK_N rows (output columns) and walks K::

         K ->   one step = BLOCK_K inputs = C chunks of W words (a chunk lies in one group)
    words [BLOCK_N, C, W]  int32, W contiguous per row: 16-byte loads
    x     [M, C, W] x 8    one tensor per code position i (k = 8w + i)
    acc   [M, BLOCK_N, C, W] += (16 s) * sum_i x'_i * v_i     (per word, no reduction)
    off   [M, BLOCK_N, C]    += (16 s) * D + b * X          (per chunk)

With v_i = 1 + q_i/16 (class A) or 1 + q_i/256 with x'_i = 16 x_i (class B), a
word adds sum_i x'_i v_i = sum_i x'_i + sum_i x_i q_i / 16. For one group, with
w = (q - z) s, a = 16 s, b = -(16 + z) s, X = sum x, D = X - sum x' = -15 * (sum of
class-B x)::

    sum_k x_k (q_k - z) s = a * sum_k x'_k v_k + a * D + b * X

X and D do not depend on the row, so they cost a few adds per step, shared by all
BLOCK_N rows. Reductions over words and chunks wait until the end. When N / BLOCK_N
programs are too few for the SMs, S programs split K and store float32 partial sums
that ``kvflow.kernels.gemv.sum_splits`` adds in split order (deterministic).
Every launch is graph-capturable: no host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels import pdl
from kvflow.kernels.gemv import k_split, split_k_epilogue, sum_splits

MAX_TOKENS = 4
"""Tokens one launch holds (all in one program's registers)."""

_ONE_BITS = 0x3F800000  # float32 1.0, a run-time argument (see _as_float)
_MASK_A = tl.constexpr(0x00780000)  # mantissa bits 19..22: 1 + q/16
_MASK_B = tl.constexpr(0x00078000)  # mantissa bits 15..18: 1 + q/256
_MASK_C = tl.constexpr(0x00007800)  # mantissa bits 11..14: 1 + q/4096


@triton.jit
def _as_float(bits, MASK: tl.constexpr, one_bits):
    """The code under MASK as a float32: 1 + q/16, 1 + q/256 or 1 + q/4096 (class A, B, C).

    ``one_bits`` is 1.0's bits (0x3F800000) passed in at run time: as a compile-time
    constant, ptxas puts it in the and-or's one immediate slot and re-materializes the
    mask in a register for every code (one extra move a weight)."""
    return ((bits & MASK) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _awq_gemv_kernel(
    x_ptr, w_ptr, sz_ptr, bias_ptr, out_ptr, partial_ptr,
    N, K, words_per_row, k_per_split, words_per_split, num_groups, stride_xm, one_bits,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """y[:, tile] over K range [s * k_per_split, + k_per_split) of program (n, s).

    Grid: ``(cdiv(N, BLOCK_N), S)``.

    Constexprs:
      M: tokens, a power of two (1, 2, 4); x has exactly M rows.
      BLOCK_N: rows of W (output columns) per program.
      BLOCK_K: inputs per step; divides K and k_per_split (K is not masked).
      GROUP: inputs per scale (G, dividing BLOCK_K), or 0 for one group over K. With
        G dividing BLOCK_K the scales of a step are C = BLOCK_K / G consecutive groups,
        so no division finds them.
      HAS_BIAS, IS_SPLIT: as in ``kvflow.kernels.gemv.split_k_epilogue``.
      NUM_STAGES: steps in flight (cp.async); Triton pipelines a loop without tl.dot
        only when asked.
      USE_PDL: launched with ``kvflow.kernels.pdl.launch_options``.
    """
    pdl.wait_for_predecessor(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    CHUNK: tl.constexpr = BLOCK_K if GROUP == 0 else GROUP
    NUM_CHUNKS: tl.constexpr = BLOCK_K // CHUNK
    WORDS: tl.constexpr = CHUNK // 8
    offs_m = tl.arange(0, M)[:, None, None, None]  # [M, 1, 1, 1]
    offs_n3 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]  # [1, BN, 1]
    offs_c3 = tl.arange(0, NUM_CHUNKS)[None, None, :]  # [1, 1, C]
    offs_n = offs_n3[:, :, :, None]  # [1, BN, 1, 1]
    offs_w = tl.arange(0, WORDS)[None, None, None, :]  # [1, 1, 1, W]
    word = offs_c3[:, :, :, None] * WORDS + offs_w  # [1, 1, C, W]: word of the step
    mask_n3 = offs_n3 < N
    mask_n = offs_n < N
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    # words_per_row = K / 8 and words_per_split = k_per_split / 8 come as arguments so
    # that Triton sees them divisible by 16 and loads 16 bytes a thread.
    w_ptrs = (w_ptr + offs_n.to(tl.int64) * words_per_row + pid_s * words_per_split
              + word)  # [1, BN, C, W]
    x_ptrs = x_ptr + offs_m * stride_xm + k_start + word * 8  # [M, 1, C, W]: code 0 of a word
    # scales_zeros [N, K/G, 2]: the step's C groups are consecutive.
    if GROUP == 0:
        sz_ptrs = sz_ptr + offs_n3.to(tl.int64) * 2 + offs_c3 * 0  # [1, BN, C]: group 0
    else:
        sz_ptrs = (sz_ptr + (offs_n3.to(tl.int64) * num_groups + k_start // GROUP) * 2
                   + offs_c3 * 2)  # [1, BN, C]
    acc = tl.zeros((M, BLOCK_N, NUM_CHUNKS, WORDS), dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        p = tl.load(w_ptrs, mask=mask_n, other=0).to(tl.uint32, bitcast=True)  # [1, BN, C, W]
        # x'_i: class A as is, B times 16, C times 256 (awq_kpack's table). A word's
        # eight x are one 16-byte load, split in registers: i = 4a + 2b + c.
        x8 = tl.load(x_ptrs[:, :, :, :, None] + tl.arange(0, 8)[None, None, None, None, :])
        x8 = tl.reshape(x8.to(tl.float32), (M, 1, NUM_CHUNKS, WORDS, 2, 2, 2))
        even, odd = tl.split(x8)  # c = 0, 1
        x04, x26 = tl.split(even)
        x15, x37 = tl.split(odd)
        x0, x4 = tl.split(x04)
        x2, x6 = tl.split(x26)
        x1, x5 = tl.split(x15)
        x3, x7 = tl.split(x37)
        x1 = x1 * 16.0
        x2 = x2 * 256.0
        x4 = x4 * 16.0
        x5 = x5 * 256.0
        x7 = x7 * 16.0
        x_a = x0 + x3 + x6
        x_b = x1 + x4 + x7
        x_c = x2 + x5
        word_x = x_a + x_b * 0.0625 + x_c * 0.00390625  # X: sum of x over the word
        word_d = x_a + x_b + x_c - word_x  # -D: sum of x' - X
        scale = tl.load(sz_ptrs, mask=mask_n3, other=0.0).to(tl.float32)  # [1, BN, C]
        zero16 = tl.load(sz_ptrs + 1, mask=mask_n3, other=0.0).to(tl.float32)  # 16 + z
        # Start each word's sum at D - (16 + z) / 16 * X (the offsets, see the module doc).
        dot = (zero16 * -0.0625)[:, :, :, None] * word_x - word_d  # [M, BN, C, W]
        # Codes as floats from three states of the word (awq_kpack's table).
        rot12 = (p << 12) | (p >> 20)
        right8 = p >> 8
        dot += x0 * _as_float(p, _MASK_A, one_bits)
        dot += x1 * _as_float(p, _MASK_B, one_bits)
        dot += x2 * _as_float(p, _MASK_C, one_bits)
        dot += x3 * _as_float(rot12, _MASK_A, one_bits)
        dot += x4 * _as_float(rot12, _MASK_B, one_bits)
        dot += x5 * _as_float(rot12, _MASK_C, one_bits)
        dot += x6 * _as_float(right8, _MASK_A, one_bits)
        dot += x7 * _as_float(right8, _MASK_B, one_bits)
        acc += (16.0 * scale)[:, :, :, None] * dot
        w_ptrs += BLOCK_K // 8
        x_ptrs += BLOCK_K
        if GROUP != 0:
            sz_ptrs += NUM_CHUNKS * 2
    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [M, BN]
    offs_m2 = tl.arange(0, M)[:, None]
    offs_n2 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    offs = offs_m2 * N + offs_n2  # into y [M, N]
    split_k_epilogue(y, offs, offs_n2, (offs_m2 < M) & (offs_n2 < N), pid_s, M * N,
                     out_ptr, bias_ptr, partial_ptr, HAS_BIAS, IS_SPLIT)


@dataclass(frozen=True)
class AWQGemvConfig:
    """Tile and launch settings of ``_awq_gemv_kernel`` (see its docstring)."""

    block_n: int
    block_k: int
    split_k: int = 1
    """Programs sharing one tile's K range (fewer when K has fewer steps)."""
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=4096)
def default_gemv_config(m: int, n: int, k: int, group_size: int,
                        device: torch.device) -> AWQGemvConfig:
    """The tile measured best on an H100 (benchmarks/kernels/bench_awq_gemv.py --sweep).

    One token, by shape (run 36, Llama-2-7B's linears, us per call in CUDA graphs): long
    K against N (down, K >= 2N) runs 64 rows x 128 inputs in 8 K splits, one step each
    (20.1 us against 22.6 for the general tile); wide N (gate_up, N >= 4K) 64 rows x 256
    inputs, no split (30.7 against 32.8); N in [2K, 4K) (qkv of an MHA model) 128 rows x
    128 inputs in 4 splits (run 38: 17.4 against 21.7; more rows a thread reuse x, which
    is what bounds these kernels: L1/TEX 74-79% busy under ncu, run 36); the rest (o)
    the general tile, 16 rows x 512 inputs. More tokens: the general tile.
    """
    del group_size, device
    block_k = 512 if k % 512 == 0 else (256 if k % 256 == 0 else 128 if k % 128 == 0 else 64)
    if m == 1 and k >= 2 * n:
        return AWQGemvConfig(block_n=64, block_k=min(block_k, 128), split_k=8, num_warps=4,
                             num_stages=1)
    if m == 1 and 2 * k <= n < 4 * k:
        return AWQGemvConfig(block_n=128, block_k=min(block_k, 128), split_k=4, num_warps=4,
                             num_stages=1)
    if m == 1 and n >= 4 * k:
        return AWQGemvConfig(block_n=64, block_k=min(block_k, 256), split_k=1, num_warps=4,
                             num_stages=3)
    split_k = 2 if n * 8 < k * 4 else 1
    return AWQGemvConfig(block_n=16, block_k=block_k, split_k=split_k, num_warps=4,
                         num_stages=3)


def _block_k_for(num_in: int, block_k: int) -> int:
    """The largest power-of-two fraction of ``block_k`` (>= 8) dividing K."""
    while num_in % block_k and block_k > 8 and block_k % 2 == 0:
        block_k //= 2
    return block_k


def awq_gemv(x: torch.Tensor, words: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
             bias: Optional[torch.Tensor] = None,
             config: Optional[AWQGemvConfig] = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16, M <= 4) @ W.T (+ bias [N]) -> [M, N] in x's dtype.

    ``words``/``scales_zeros``/``group_size`` are an ``awq_kpack.KPackWeight``'s
    fields; inputs are read only.
    """
    assert x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16), (
        f"x must be [M, K] fp16/bf16, got {x.dtype} {tuple(x.shape)}")
    num_tokens, num_in = x.shape
    assert 0 < num_tokens <= MAX_TOKENS, f"awq_gemv holds 1..{MAX_TOKENS} tokens, got {num_tokens}"
    assert x.stride(1) == 1, "x's K dim must be contiguous"
    assert words.dtype == torch.int32 and words.is_contiguous() and words.dim() == 2, (
        f"words must be contiguous int32 [N, K/8], got {words.dtype} {tuple(words.shape)}")
    num_out = words.shape[0]
    assert words.shape[1] * 8 == num_in, f"words {tuple(words.shape)} vs K={num_in}"
    assert num_in % group_size == 0, f"K={num_in} is not a multiple of group_size={group_size}"
    assert scales_zeros.shape == (num_out, num_in // group_size, 2), (
        f"scales_zeros must be [N, K/G, 2] = [{num_out}, {num_in // group_size}, 2], "
        f"got {tuple(scales_zeros.shape)}")
    assert scales_zeros.dtype == torch.float16 and scales_zeros.is_contiguous()
    assert x.device == words.device == scales_zeros.device
    if bias is not None:
        assert bias.shape == (num_out,) and bias.is_contiguous(), (
            f"bias must be a contiguous [{num_out}] tensor, got {tuple(bias.shape)}")
    cfg = config or default_gemv_config(num_tokens, num_out, num_in, group_size, x.device)
    is_one_group = group_size == num_in
    block_k = _block_k_for(num_in, max(cfg.block_k, 1 if is_one_group else group_size))
    assert num_in % block_k == 0 and (is_one_group or block_k % group_size == 0), (
        f"K={num_in}, G={group_size}: no block_k of whole groups dividing K (got {block_k})")
    tokens_pow2 = triton.next_power_of_2(num_tokens)
    if tokens_pow2 != num_tokens:  # M = 3: pad x to 4 rows (tiny copy), keep 3 outputs
        padded = x.new_zeros(tokens_pow2, num_in)
        padded[:num_tokens] = x
        return awq_gemv(padded, words, scales_zeros, group_size, bias, cfg)[:num_tokens]
    out = torch.empty(num_tokens, num_out, dtype=x.dtype, device=x.device)
    per_split, num_splits = k_split(num_in, block_k, cfg.split_k)
    is_split = num_splits > 1
    partial = torch.empty(num_splits if is_split else 0, num_tokens, num_out,
                          dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_out, cfg.block_n), num_splits)
    options = pdl.launch_options(x.device)
    _awq_gemv_kernel[grid](
        x, words, scales_zeros, bias if bias is not None else out, out, partial,
        num_out, num_in, num_in // 8, per_split, per_split // 8, num_in // group_size,
        x.stride(0), _ONE_BITS,
        M=num_tokens, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        GROUP=0 if is_one_group else group_size,
        HAS_BIAS=bias is not None and not is_split, IS_SPLIT=is_split,
        NUM_STAGES=cfg.num_stages, USE_PDL=bool(options), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **options)
    if is_split:
        sum_splits(partial, bias, out)
    return out
