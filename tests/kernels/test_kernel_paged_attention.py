"""Triton paged attention against the plain-torch reference (float32 truth).

Block size S = 16 unless a test says otherwise; context lengths sit on block and
tile edges (S-1, S, S+1, 2S, ...). SMALL tiles force several K/V tiles and
q-blocks even at the interpreter's tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from kvflow.attention.metadata import longest_first
from kvflow.kernels import ref
from kvflow.kernels.paged_attention import (
    PagedAttentionConfig,
    choose_config,
    choose_num_kv_splits,
    paged_attention,
)

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = PagedAttentionConfig(block_m=16, tile_n=16)
MEDIUM = PagedAttentionConfig(block_m=32, tile_n=32)
HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]  # (H, Hkv): MHA, GQA 2, GQA 4, MQA

# A prefill from scratch, a chunk over cached context, decodes, an idle request.
MIXED_Q_LENS = [1, 5, 40, 0, 1, 17, 3]
MIXED_SEQ_LENS = [17, 5, 70, 16, 33, 48, 32]
# The same kinds of request, fewer tokens: for the slower (split, ALiBi, window) sweeps.
SHORT_Q_LENS = [1, 5, 18, 0, 1]
SHORT_SEQ_LENS = [17, 5, 50, 16, 33]


def check(batch, tol, *, sliding_window=None, alibi_slopes=None, scale=None, **kwargs):
    scale = batch.q.shape[-1] ** -0.5 if scale is None else scale
    common = dict(scale=scale, max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
                  sliding_window=sliding_window, alibi_slopes=alibi_slopes)
    out = paged_attention(batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens,
                          batch.block_tables, **common, **kwargs)
    expected = ref.paged_attention(batch.q.float(), batch.kv_cache_ref.float(), batch.query_start_loc,
                                   batch.seq_lens, batch.block_tables, **common)
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    num_real = int(batch.query_start_loc[-1])
    assert torch.isfinite(out[:num_real]).all(), "kernel read a slot it must not (NaN-poisoned)"
    torch.testing.assert_close(out[:num_real].float(), expected[:num_real], **tol(batch.q.dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("config", [None, SMALL], ids=["auto", "small"])
def test_decode_block_edges(paged_batch, tol, dtype, heads, config):
    seq_lens = [1, 15, 16, 17, 32, 33, 70]
    batch = paged_batch([1] * len(seq_lens), seq_lens, num_heads=heads[0], num_kv_heads=heads[1],
                        head_size=32, block_size=16, dtype=dtype)
    check(batch, tol, config=config, num_kv_splits=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("config", [None, SMALL, MEDIUM], ids=["auto", "small", "medium"])
def test_mixed_prefill_and_decode(paged_batch, tol, dtype, heads, config):
    batch = paged_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_heads=heads[0], num_kv_heads=heads[1],
                        head_size=32, block_size=16, dtype=dtype)
    check(batch, tol, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [16, 64, 128] + ([256] if ON_GPU else []))
def test_head_sizes(paged_batch, tol, dtype, head_size):
    batch = paged_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_heads=4, num_kv_heads=2,
                        head_size=head_size, block_size=16, dtype=dtype)
    check(batch, tol)


@pytest.mark.parametrize("block_size", [1, 8, 32, 128])
@pytest.mark.parametrize("config", [None, SMALL], ids=["auto", "small"])
def test_block_sizes(paged_batch, tol, block_size, config):
    batch = paged_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_heads=4, num_kv_heads=2,
                        head_size=16, block_size=block_size, dtype=torch.float32)
    check(batch, tol, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 4, 16, 17, 1000])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_sliding_window(paged_batch, tol, dtype, window, num_kv_splits):
    batch = paged_batch(SHORT_Q_LENS, SHORT_SEQ_LENS, num_heads=4, num_kv_heads=2, head_size=16,
                        block_size=16, dtype=dtype, sliding_window=window)
    check(batch, tol, sliding_window=window, config=SMALL, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("num_kv_splits", [1, 4])
def test_alibi(paged_batch, tol, device, dtype, window, num_kv_splits):
    num_heads = 8
    # The standard ALiBi slopes for 8 heads: 2^-1 .. 2^-8.
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(num_heads)], device=device)
    batch = paged_batch(SHORT_Q_LENS, SHORT_SEQ_LENS, num_heads=num_heads, num_kv_heads=2,
                        head_size=16, block_size=16, dtype=dtype, sliding_window=window)
    check(batch, tol, alibi_slopes=slopes, sliding_window=window, config=SMALL,
          num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 2), (4, 1)])
@pytest.mark.parametrize("num_kv_splits", [2, 3, 16])
def test_split_kv_decode(paged_batch, tol, dtype, heads, num_kv_splits):
    # 16 splits of at most 5 tiles: most partitions are empty and must weigh nothing.
    seq_lens = [1, 16, 17, 50, 80]
    batch = paged_batch([1] * len(seq_lens), seq_lens, num_heads=heads[0], num_kv_heads=heads[1],
                        head_size=32, block_size=16, dtype=dtype)
    check(batch, tol, config=SMALL, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
@pytest.mark.parametrize("order", ["longest_first", "reversed", "shuffled"])
def test_decode_order(paged_batch, tol, device, num_kv_splits, order):
    """The launch order of a decode step's programs changes no output row."""
    seq_lens = [5, 70, 17, 1, 33, 16, 48]
    batch = paged_batch([1] * len(seq_lens), seq_lens, num_heads=8, num_kv_heads=2,
                        head_size=16, block_size=16, dtype=torch.float32)
    perm = {"longest_first": longest_first(seq_lens),
            "reversed": list(range(len(seq_lens)))[::-1],
            "shuffled": torch.randperm(len(seq_lens), generator=torch.Generator().manual_seed(1)).tolist()}[order]
    if order == "longest_first":
        assert [seq_lens[i] for i in perm] == sorted(seq_lens, reverse=True)
    decode_order = torch.tensor(perm, dtype=torch.int32, device=device)
    out = check(batch, tol, config=SMALL, num_kv_splits=num_kv_splits, decode_order=decode_order)
    plain = check(batch, tol, config=SMALL, num_kv_splits=num_kv_splits)
    assert torch.equal(out, plain)  # each program computes the same thing wherever it starts


def test_decode_order_is_checked(paged_batch, device):
    batch = paged_batch([1, 1], [5, 9], num_heads=4, num_kv_heads=2, head_size=16,
                        block_size=16, dtype=torch.float32)
    with pytest.raises(AssertionError, match="decode_order must be int32"):
        check(batch, None, decode_order=torch.tensor([1, 0, 2], dtype=torch.int32, device=device))


@pytest.mark.parametrize("num_kv_splits", [2, 5])
def test_split_kv_mixed(paged_batch, tol, num_kv_splits):
    # The kernel splits any batch; the launcher only chooses to for decode-only ones.
    batch = paged_batch(SHORT_Q_LENS, SHORT_SEQ_LENS, num_heads=4, num_kv_heads=2, head_size=16,
                        block_size=16, dtype=torch.float32)
    check(batch, tol, config=SMALL, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_padding_tokens_past_the_batch(paged_batch, tol, device, num_kv_splits):
    """CUDA-graph padding: q has rows past query_start_loc[B]; they are ignored."""
    batch = paged_batch([1, 6, 1], [9, 20, 33], num_heads=4, num_kv_heads=2, head_size=16,
                        block_size=16, dtype=torch.float32)
    batch.q = torch.cat([batch.q, torch.randn(5, 4, 16, device=device)])
    check(batch, tol, config=SMALL, num_kv_splits=num_kv_splits)


def test_scale_is_applied(paged_batch, tol):
    batch = paged_batch([3, 1], [3, 20], num_heads=2, num_kv_heads=1, head_size=16, block_size=16,
                        dtype=torch.float32)
    check(batch, tol, scale=0.05)
    check(batch, tol, scale=1.7)


@pytest.mark.parametrize("head_size", [8, 80])
def test_rejects_unsupported_head_size(device, head_size):
    q = torch.zeros(1, 2, head_size, device=device)
    kv_cache = torch.zeros(2, 2, 16, 1, head_size, device=device)
    one = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="power-of-two head size"):
        paged_attention(q, kv_cache, torch.tensor([0, 1], dtype=torch.int32, device=device), one,
                        torch.zeros(1, 1, dtype=torch.int32, device=device), scale=1.0,
                        max_query_len=1, max_seq_len=1)


def test_choose_config():
    decode = choose_config(1, 4, 128)
    assert decode.block_m == 16 and decode.tile_n == 64
    prefill = choose_config(2048, 4, 128)
    assert prefill.block_m == 128 and prefill.num_warps == 8
    assert choose_config(4, 4, 128).block_m == 16  # short queries: thin tile
    assert choose_config(1, 32, 128).block_m == 32  # MQA with 32 query heads
    assert choose_config(2048, 4, 256).tile_n == 32
    with pytest.raises(ValueError, match="power of two"):
        PagedAttentionConfig(block_m=24, tile_n=16)


def test_choose_num_kv_splits(device):
    assert choose_num_kv_splits(1, 8, 7, 32768, device) == 1  # never for prefill
    if ON_GPU:
        assert choose_num_kv_splits(1, 8, 1, 32768, device) > 8
        assert choose_num_kv_splits(1, 8, 1, 100, device) == 1  # one partition of >= 256 keys
        assert choose_num_kv_splits(256, 8, 1, 32768, device) == 1  # enough programs already
    else:
        assert choose_num_kv_splits(1, 8, 1, 32768, device) == 1


# ---- larger shapes: on a GPU only, where they run in milliseconds -------------------------

GPU_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.skipif(not ON_GPU, reason="large shapes run on the GPU")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("heads,head_size", [((32, 8), 128), ((32, 4), 64), ((16, 2), 256),
                                             ((28, 4), 128), ((32, 32), 128), ((16, 1), 128)])
@pytest.mark.parametrize("num_kv_splits", [None, 1, 7])
def test_gpu_large_decode(paged_batch, tol, dtype, heads, head_size, num_kv_splits):
    gen = torch.Generator().manual_seed(1)
    seq_lens = [1, 15, 16, 17, 4095, 4096, 4097] + torch.randint(1, 3000, (25,), generator=gen).tolist()
    batch = paged_batch([1] * len(seq_lens), seq_lens, num_heads=heads[0], num_kv_heads=heads[1],
                        head_size=head_size, block_size=16, dtype=dtype)
    check(batch, tol, num_kv_splits=num_kv_splits)


@pytest.mark.skipif(not ON_GPU, reason="large shapes run on the GPU")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("heads,head_size", [((32, 8), 128), ((16, 2), 256), ((12, 12), 64)])
@pytest.mark.parametrize("window,alibi", [(None, False), (1000, False), (None, True), (333, True)])
def test_gpu_large_mixed(paged_batch, tol, device, dtype, heads, head_size, window, alibi):
    q_lens = [1] * 20 + [1000, 513, 2048, 64, 7]
    seq_lens = [300 + 97 * i for i in range(20)] + [1000, 3000, 2048, 4160, 9]
    batch = paged_batch(q_lens, seq_lens, num_heads=heads[0], num_kv_heads=heads[1],
                        head_size=head_size, block_size=16, dtype=dtype, sliding_window=window)
    slopes = (torch.rand(heads[0], device=device) * 0.1) if alibi else None
    check(batch, tol, sliding_window=window, alibi_slopes=slopes)


@pytest.mark.skipif(not ON_GPU, reason="large shapes run on the GPU")
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_gpu_large_long_decode_auto_split(paged_batch, tol, block_size):
    """Batch 2 at 32k context: the launcher's heuristic splits the key range."""
    batch = paged_batch([1, 1], [32768, 20001], num_heads=32, num_kv_heads=8, head_size=128,
                        block_size=block_size, dtype=torch.bfloat16)
    assert choose_num_kv_splits(2, 8, 1, 32768, batch.q.device) > 1
    check(batch, tol)
