"""Paged attention for a flat batch of prefill chunks and decodes (Triton).

Shape letters: T = tokens in the step, B = requests, H = query heads,
Hkv = KV heads, G = H // Hkv (query heads per KV head), D = head size,
N = blocks in the pool, S = cache block size, P = max blocks per request.

One kernel serves every request of the batch, whatever its query length
(``kvflow.attention.metadata`` draws the layout). A program owns one
*q-block* -- up to BLOCK_Q consecutive new tokens of one request -- and one
KV head, and streams that request's keys/values through the block table in
tiles of TILE_N tokens. The G query heads that share the KV head ride in the
same program, so each K/V tile is read once per KV head, not once per query
head::

    rows of the Q tile (BLOCK_M >= BLOCK_Q * G, a power of two; the rest is padding)
    row r -> token  q_first + r // G   of the request
             head   kv_head * G + r % G

    keys     0 .......... p_min ...... p_max       (p = ctx_len + local query index)
    tiles    | unmasked | unmasked | masked |      tiles wholly <= p_min need no mask

Decodes at small batch and long context leave most SMs idle (B * Hkv
programs), so the launcher may split each request's key range into
``num_kv_splits`` partitions (flash-decoding): each program writes its
partial max / sum / unnormalised output in float32, and a second kernel
combines them. The partition length is computed in the kernel from each
request's own length, so the grid depends only on (T, B, Hkv, splits, tiles): the
launch is safe to capture in a CUDA graph whatever the sequence lengths.

Softmax runs in float32 in base 2 (scale folded with log2(e)). The reference
is ``kvflow.kernels.ref.paged_attention``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels import pdl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Tile shape and launch parameters of the attention kernel."""

    block_m: int
    """Rows of the Q tile (query tokens x query heads of one KV head); power of two >= 16."""
    tile_n: int
    """Keys per K/V tile; power of two >= 16; any cache block size works (per-token gather)."""
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "tile_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"PagedAttentionConfig.{name}={value} must be a power of two >= 16.")


def choose_config(max_query_len: int, num_queries_per_kv: int, head_size: int) -> PagedAttentionConfig:
    """The default tiles: thin Q tiles for decode (memory bound), fat ones for prefill (compute bound)."""
    group = triton.next_power_of_2(num_queries_per_kv)
    tile_n = 64 if head_size <= 128 else 32
    if max_query_len == 1:
        # One token per request: the Q tile only holds G rows; 16 is tl.dot's minimum.
        # Two stages: against three, faster on 24 of 29 decode shapes on the H100 (batch
        # 1..256 x context 512..32k; 16-20% at batch 64, 6% at T1's batch 128 x 1024),
        # 4-7% slower on 4 (benchmarks/RESULTS.md, fourth session).
        return PagedAttentionConfig(block_m=max(16, group), tile_n=tile_n, num_warps=4,
                                    num_stages=2)
    block_m = 128 if head_size <= 128 else 64
    # Short queries (speculative decoding, small chunks) would waste most of a 128-row tile.
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len * num_queries_per_kv)))
    block_m = max(block_m, group)
    return PagedAttentionConfig(block_m=block_m, tile_n=tile_n,
                                num_warps=8 if block_m >= 128 else 4, num_stages=2)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_kv_splits(num_reqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                         device: torch.device) -> int:
    """How many partitions of the key range: > 1 only where B * Hkv programs leave SMs idle.

    Only decode-only batches are split: prefill q-blocks already give enough programs.
    A partition keeps at least 256 keys so its fixed cost (Q load, partial write) stays small.
    """
    if max_query_len != 1 or device.type != "cuda":
        return 1
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    num_programs = num_reqs * num_kv_heads
    if num_programs >= 2 * num_sms:
        return 1
    return max(1, min(triton.cdiv(4 * num_sms, num_programs), triton.cdiv(max_seq_len, 256), 64))


def graph_num_kv_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """The split count a CUDA graph of ``batch_size`` decodes is captured with.

    A graph serves every context length, so unlike ``choose_num_kv_splits`` this
    cannot look at the lengths: split only where B * Hkv programs leave SMs idle, 8
    ways, or up to 32 where that still leaves fewer than two programs per SM (batch 1-4
    of GQA-8 models). Measured on the H100 with the count pinned (bench_attention.py
    --splits, benchmarks/RESULTS.md fifth session), batch 1 x 8 KV heads: 32 splits
    cost 0.4 us more than 8 at 512 keys and save 15 us at 8k keys, 61 us at 32k; a
    partition of one tile, or none, costs little. Large batches get 1: splitting them
    shortens every program's loop and adds a reduce pass for nothing (T1).
    """
    num_programs = batch_size * num_kv_heads
    if num_programs >= 2 * num_sms:
        return 1
    cap = max(8, min(32, triton.cdiv(2 * num_sms, num_programs)))
    return max(1, min(triton.cdiv(4 * num_sms, num_programs), cap))


def num_sms(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    # float32 inputs use exact IEEE products (TF32 would miss the 1e-4 tolerance).
    # UPCAST (CPU interpreter only): Triton's interpreter miscomputes bfloat16
    # tl.dot; bf16/fp16 products are exact in float32, so the numerics match the GPU path.
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IS_FP32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q,
    tile, k_cache_ptr, v_cache_ptr, block_table_ptr,
    stride_cn, stride_cs, kv_head_off,
    seq_len, kv_lo, q_pos, alibi_log2, sliding_window, scale_log2,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
):
    """One online-softmax step over keys tile*TILE_N .. tile*TILE_N + TILE_N - 1."""
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_SIZE)
    k_pos = tile * TILE_N + offs_n  # [TILE_N]
    if MASKED:
        # Past seq_len (or below the window) the block table may hold padding:
        # never dereference it, and never load K/V there (uninitialised cache may hold NaN).
        kv_valid = (k_pos < seq_len) & (k_pos >= kv_lo)
        block = tl.load(block_table_ptr + k_pos // BLOCK_SIZE, mask=kv_valid, other=0)
    else:
        block = tl.load(block_table_ptr + k_pos // BLOCK_SIZE)
    # int64: a layer's cache may exceed 2**31 elements.
    slot_off = block.to(tl.int64) * stride_cn + (k_pos % BLOCK_SIZE) * stride_cs + kv_head_off
    k_ptrs = k_cache_ptr + slot_off[None, :] + offs_d[:, None]  # [D, TILE_N]
    v_ptrs = v_cache_ptr + slot_off[:, None] + offs_d[None, :]  # [TILE_N, D]
    if MASKED:
        k = tl.load(k_ptrs, mask=kv_valid[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)

    s = _dot(q, k, IS_FP32, UPCAST) * scale_log2  # [BLOCK_M, TILE_N], log2 units
    if HAS_ALIBI:
        s += alibi_log2[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
    if MASKED:
        allowed = (k_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :]
        if HAS_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=kv_valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IS_FP32, UPCAST)
    return acc, m_new, l_i


# Run-time ints that vary step to step are not specialised (Triton compiles a variant for
# an int equal to 1 and one for a multiple of 16): an eager step of a new batch size would
# otherwise compile mid-serving. Only tile choices (constexprs) make variants.
@triton.jit(do_not_specialize=["sliding_window", "num_reqs", "num_heads", "num_splits"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, alibi_slopes_ptr, order_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2, sliding_window, num_reqs, num_heads, num_kv_heads, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cn, stride_cs, stride_ch, stride_bt,
    NUM_QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    IS_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Attention of one q-block of one request against its paged context, for one KV head.

    Grid: ``(num_q_blocks * Hkv, 1, num_splits)``: program ``i`` of axis 0 takes KV head
    ``i % Hkv`` of the ``i // Hkv``-th q-block in launch order, so the GPU starts every
    head of one q-block before the next q-block. With ``num_q_blocks = T // BLOCK_Q + B``
    (``T`` when BLOCK_Q == 1). Request b owns q-blocks
    ``first_q_block(b) = query_start_loc[b] // BLOCK_Q + b`` (``query_start_loc[b]`` when
    BLOCK_Q == 1) up to ``first_q_block(b+1)``; the ``+ b`` slack covers each request's
    last, partial q-block, so the grid needs no host-side count of blocks per request.
    Programs with no query row to compute exit at once. Launch order: ``order[i]`` with
    HAS_ORDER (decode-only launches, heaviest request first), else last q-block to first.
    Split s of a q-block handles the s-th of ``num_splits`` equal runs of its key tiles
    (as many as there are tiles: one tile each beats fewer, longer runs at every short
    context measured, benchmarks/RESULTS.md fifth session).

    Constexprs:
      NUM_QUERIES_PER_KV: G = H // Hkv.
      BLOCK_M:    rows of the Q tile, a power of two >= max(16, G); rows past
                  BLOCK_Q * G are padding.
      BLOCK_Q:    query tokens per q-block, <= BLOCK_M // G (1 for decode-only batches).
      BLOCK_SIZE: cache block size S.
      HEAD_SIZE:  D, a power of two >= 16.
      TILE_N:     keys per tile, a power of two >= 16.
      HAS_ALIBI:  add slope[h] * (k - p) to the scores (slopes float32 [H]).
      HAS_WINDOW: keep only keys k > p - sliding_window.
      HAS_ORDER:  BLOCK_Q == 1 and ``order`` (int32 [T]) lists the q-blocks in launch order.
      IS_SPLIT:   write float32 partials (unnormalised output, base-2 max, sum) of
                  split ``program_id(2)`` to part_* ([T, H, num_splits(, D)]) instead
                  of the normalised output.
      IS_FP32:    inputs are float32: IEEE dot products.
      UPCAST:     CPU interpreter: dot products in float32 (see ``_dot``).
      USE_PDL:    launched with ``kvflow.kernels.pdl.launch_options``.
    """
    pdl.wait_for_predecessor(USE_PDL)
    # Heaviest work first, so the light programs fill the tail of the launch: the order
    # given (decodes by context length, longest first), else each request's last q-block
    # (most keys under the causal mask) before its earlier ones.
    kv_head = tl.program_id(0) % num_kv_heads
    rank = tl.program_id(0) // num_kv_heads
    if HAS_ORDER:
        q_block = tl.load(order_ptr + rank)
    else:
        q_block = tl.num_programs(0) // num_kv_heads - 1 - rank
    split = tl.program_id(2)

    num_q_blocks_used = tl.load(query_start_loc_ptr + num_reqs)
    if BLOCK_Q > 1:
        num_q_blocks_used = num_q_blocks_used // BLOCK_Q + num_reqs
    if q_block >= num_q_blocks_used:
        return  # batch padding past query_start_loc[B]
    # The request owning q_block is the last b with first_q_block(b) <= q_block.
    lo = q_block * 0
    hi = lo + num_reqs
    if BLOCK_Q == 1:
        # Decodes (one token each, scheduled first) own q-block b = request b: try that
        # before paying log2(B) dependent loads of the binary search below.
        guess = tl.minimum(q_block, num_reqs - 1)
        hit = (tl.load(query_start_loc_ptr + guess) <= q_block) & (
            q_block < tl.load(query_start_loc_ptr + guess + 1))
        lo = tl.where(hit, guess, lo)
        hi = tl.where(hit, guess + 1, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid)
        if BLOCK_Q > 1:
            first = first // BLOCK_Q + mid
        if first <= q_block:
            lo = mid
        else:
            hi = mid
    req = lo
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if BLOCK_Q > 1:
        q_first = (q_block - (q_start // BLOCK_Q + req)) * BLOCK_Q
    else:
        q_first = q_block - q_start
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_SIZE)
    q_local = q_first + offs_m // NUM_QUERIES_PER_KV  # [BLOCK_M]
    head = kv_head * NUM_QUERIES_PER_KV + offs_m % NUM_QUERIES_PER_KV
    row_valid = (offs_m // NUM_QUERIES_PER_KV < BLOCK_Q) & (q_local < q_len)
    q_pos = ctx_len + q_local
    token = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]
    alibi_log2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        alibi_log2 = tl.load(alibi_slopes_ptr + head, mask=row_valid, other=0.0) * 1.4426950408889634

    # Key tiles this q-block needs: [t_lo, n_total); those below n_full need no mask.
    p_min = ctx_len + q_first
    p_max = ctx_len + tl.minimum(q_first + BLOCK_Q, q_len) - 1
    n_total = (p_max + TILE_N) // TILE_N
    if HAS_WINDOW:
        kv_lo = tl.maximum(p_min - sliding_window + 1, 0)
        t_lo = kv_lo // TILE_N
        n_full = t_lo  # the window's lower edge moves per row: mask every tile
    else:
        kv_lo = 0
        t_lo = 0
        n_full = (p_min + 1) // TILE_N
    tiles_per_split = tl.cdiv(n_total - t_lo, num_splits)
    s_lo = t_lo + split * tiles_per_split
    s_hi = tl.minimum(s_lo + tiles_per_split, n_total)

    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_ch
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for tile in range(s_lo, tl.minimum(s_hi, n_full)):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, tile, k_cache_ptr, v_cache_ptr, block_table_ptr,
            stride_cn, stride_cs, kv_head_off, seq_len, kv_lo, q_pos, alibi_log2,
            sliding_window, scale_log2,
            BLOCK_SIZE, HEAD_SIZE, TILE_N, False, HAS_ALIBI, HAS_WINDOW, IS_FP32, UPCAST)
    for tile in range(tl.maximum(s_lo, n_full), s_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, tile, k_cache_ptr, v_cache_ptr, block_table_ptr,
            stride_cn, stride_cs, kv_head_off, seq_len, kv_lo, q_pos, alibi_log2,
            sliding_window, scale_log2,
            BLOCK_SIZE, HEAD_SIZE, TILE_N, True, HAS_ALIBI, HAS_WINDOW, IS_FP32, UPCAST)

    if IS_SPLIT:
        # An empty split still writes (m=-inf, l=0, acc=0) so the reducer reads no garbage.
        part_row = (token * num_heads + head) * num_splits + split  # [BLOCK_M]
        tl.store(part_m_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_l_ptr + part_row, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_SIZE + offs_d[None, :], acc,
                 mask=row_valid[:, None])
    else:
        # Padding rows may have l = 0; they are not stored, but keep the division finite.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit(do_not_specialize=["num_reqs", "num_heads", "num_splits"])
def _reduce_kv_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr,
    num_reqs, num_heads, num_splits, stride_ot, stride_oh,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Combines the split partials of one (token, head) into the normalised output.

    Grid: ``(T, H)``. Tokens past ``query_start_loc[B]`` (batch padding) are left unwritten.

    Constexprs:
      HEAD_SIZE:    D.
      BLOCK_SPLITS: next power of two >= num_splits; splits past num_splits are masked.
      USE_PDL:      launched with ``kvflow.kernels.pdl.launch_options``.
    """
    pdl.wait_for_predecessor(USE_PDL)
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_reqs):
        return
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_SIZE)
    split_valid = offs_s < num_splits
    row = (token.to(tl.int64) * num_heads + head) * num_splits + offs_s  # [BLOCK_SPLITS]
    m = tl.load(part_m_ptr + row, mask=split_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    # Empty splits carry m = -inf: weight 0 (every valid row has one non-empty split).
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_SIZE + offs_d[None, :],
                  mask=split_valid[:, None], other=0.0)  # [BLOCK_SPLITS, D]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty))


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, N, S, Hkv, D]
    query_start_loc: torch.Tensor,  # int32 [B+1]
    seq_lens: torch.Tensor,  # int32 [B]
    block_tables: torch.Tensor,  # int32 [B, P]
    *,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: Optional[int] = None,
    alibi_slopes: Optional[torch.Tensor] = None,  # float32 [H]
    num_kv_splits: Optional[int] = None,
    config: Optional[PagedAttentionConfig] = None,
    out: Optional[torch.Tensor] = None,  # [T, H, D]
    decode_order: Optional[torch.Tensor] = None,  # int32 [T]
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each request's new tokens over its paged context.

    Semantics are ``kvflow.attention.backends.base.BaseAttentionBackend``'s. The cache
    must already hold this step's keys/values. ``max_query_len`` and ``max_seq_len``
    (host ints, no device sync) only pick tiles and the split count: results are right
    for any values, speed is best with the true maxima. ``num_kv_splits``: None =
    heuristic (``choose_num_kv_splits``), 1 = no split; fix it when capturing CUDA graphs
    so replays do not depend on the capture batch's lengths. ``config`` overrides the
    tile choice (benchmarks, tests). Rows of tokens past ``query_start_loc[B]`` are left
    unwritten. Scratch for the split path is allocated per call (caching allocator).

    ``decode_order`` (decode-only steps, one token per request, so T == B): a permutation
    of the requests in which their programs start, longest context first
    (``kvflow.attention.metadata.longest_first``). It changes no result, only the
    makespan: in a batch of mixed lengths the long requests started last otherwise run
    alone at the end of the launch while the SMs around them idle. Ignored for steps with
    longer queries.
    """
    assert q.dim() == 3, f"q must be [T, H, D], got {tuple(q.shape)}"
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, (
        f"kv_cache must be [2, N, S, Hkv, D], got {tuple(kv_cache.shape)}")
    num_tokens, num_heads, head_size = q.shape
    _, _, block_size, num_kv_heads, cache_head_size = kv_cache.shape
    if head_size < 16 or head_size & (head_size - 1) or cache_head_size != head_size:
        raise ValueError(
            f"Triton paged attention needs a power-of-two head size >= 16 shared by q and the "
            f"KV cache; got q head size {head_size}, cache head size {cache_head_size}. "
            f"Use attention backend 'torch' for this model.")
    assert num_heads % num_kv_heads == 0, (
        f"query heads {num_heads} must be a multiple of KV heads {num_kv_heads}")
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"q dtype {q.dtype}"
    assert kv_cache.dtype == q.dtype, f"kv_cache dtype {kv_cache.dtype} != q dtype {q.dtype}"
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1, "head dim of q and kv_cache must be contiguous"
    num_reqs = seq_lens.shape[0]
    assert query_start_loc.dtype == torch.int32 and query_start_loc.shape == (num_reqs + 1,), (
        f"query_start_loc must be int32 [{num_reqs + 1}], got {query_start_loc.dtype} "
        f"{tuple(query_start_loc.shape)}")
    assert seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
    assert query_start_loc.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2, (
        f"block_tables must be int32 [B, P], got {block_tables.dtype} {tuple(block_tables.shape)}")
    assert block_tables.shape[0] == num_reqs and block_tables.stride(1) == 1
    assert q.device == kv_cache.device == query_start_loc.device == seq_lens.device == block_tables.device
    assert sliding_window is None or sliding_window > 0, f"sliding_window={sliding_window}"
    if alibi_slopes is not None:
        assert alibi_slopes.dtype == torch.float32 and alibi_slopes.shape == (num_heads,), (
            f"alibi_slopes must be float32 [{num_heads}], got {alibi_slopes.dtype} "
            f"{tuple(alibi_slopes.shape)}")
        assert alibi_slopes.is_contiguous() and alibi_slopes.device == q.device
    if out is None:
        out = torch.empty_like(q)
    else:
        assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    if num_tokens == 0 or num_reqs == 0:
        return out

    group = num_heads // num_kv_heads
    if config is None:
        config = choose_config(max_query_len, group, head_size)
    assert config.block_m >= group, f"config.block_m={config.block_m} < query heads per KV head {group}"
    # Never more query rows than the longest query needs (decode-only: one token per
    # q-block, so request b owns q-block b); a power of two keeps compiled variants few.
    block_q = max(1, min(config.block_m // group, triton.next_power_of_2(max(1, max_query_len))))
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(num_reqs, num_kv_heads, max_query_len, max_seq_len, q.device)
    assert num_kv_splits >= 1, f"num_kv_splits={num_kv_splits}"
    num_q_blocks = num_tokens // block_q + num_reqs if block_q > 1 else num_tokens
    has_order = decode_order is not None and block_q == 1
    if has_order:
        assert decode_order.dtype == torch.int32 and decode_order.shape == (num_tokens,), (
            f"decode_order must be int32 [{num_tokens}], got {decode_order.dtype} "
            f"{tuple(decode_order.shape)}")
        assert decode_order.is_contiguous() and decode_order.device == q.device

    is_split = num_kv_splits > 1
    if is_split:
        part_acc = torch.empty(num_tokens, num_heads, num_kv_splits, head_size,
                               dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_tokens, num_heads, num_kv_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert k_cache.stride() == v_cache.stride()

    options = pdl.launch_options(q.device)
    _paged_attention_kernel[(num_q_blocks * num_kv_heads, 1, num_kv_splits)](
        out, q, k_cache, v_cache,
        block_tables, seq_lens, query_start_loc,
        alibi_slopes if alibi_slopes is not None else q,
        decode_order if has_order else query_start_loc,
        part_acc, part_m, part_l,
        scale * _LOG2E, sliding_window if sliding_window is not None else 0,
        num_reqs, num_heads, num_kv_heads, num_kv_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_QUERIES_PER_KV=group,
        BLOCK_M=config.block_m,
        BLOCK_Q=block_q,
        BLOCK_SIZE=block_size,
        HEAD_SIZE=head_size,
        TILE_N=config.tile_n,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_WINDOW=sliding_window is not None,
        HAS_ORDER=has_order,
        IS_SPLIT=is_split,
        IS_FP32=q.dtype == torch.float32,
        UPCAST=q.device.type != "cuda",
        USE_PDL=bool(options),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **options,
    )
    if is_split:
        _reduce_kv_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_m, part_l, query_start_loc,
            num_reqs, num_heads, num_kv_splits, out.stride(0), out.stride(1),
            HEAD_SIZE=head_size,
            BLOCK_SPLITS=triton.next_power_of_2(num_kv_splits),
            USE_PDL=bool(options),
            num_warps=4 if head_size >= 128 else 2,
            **options,
        )
    return out
