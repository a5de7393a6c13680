"""The batched (padded) torch attention equals the per-request reference loop."""

from __future__ import annotations

import pytest
import torch

from kvflow.attention.backends.torch_ref import (attention_reference, gather_context,
                                                 padded_attention, write_kv_cache)
from kvflow.attention.metadata import AttentionMetadata


def _batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, seed):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(per_req) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()  # shuffled block tables
    tables, pos = [], 0
    for n in per_req:
        tables.append(perm[pos:pos + n])
        pos += n
    width = max(per_req)
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    T = sum(q_lens)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = []
    for t, c, q in zip(tables, ctx_lens, q_lens):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(c, c + q)]
    md = AttentionMetadata(
        num_tokens=T, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    q = torch.randn(T, num_heads, head_dim, generator=g)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g)
    return q, k, v, kv, md


@pytest.mark.parametrize("q_lens, ctx_lens", [([1, 1, 1], [0, 15, 33]), ([5, 1, 17], [16, 3, 0]),
                                              ([1], [100]), ([9, 4], [7, 31])])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window, alibi", [(None, False), (5, False), (None, True)])
def test_padded_equals_reference(q_lens, ctx_lens, heads, window, alibi):
    num_heads, num_kv_heads = heads
    q, k, v, kv, md = _batch(q_lens, ctx_lens, num_heads, num_kv_heads, 8, 4, seed=len(q_lens))
    slopes = torch.rand(num_heads) if alibi else None
    write_kv_cache(k, v, kv, md.slot_mapping)
    got = padded_attention(q, kv, md, scale=0.3, sliding_window=window, alibi_slopes=slopes)
    for b, seq_len in enumerate(md.seq_lens_cpu):
        lo, hi = md.query_start_loc_cpu[b], md.query_start_loc_cpu[b + 1]
        keys, values = gather_context(kv, md.block_tables[b], seq_len)
        want = attention_reference(q[lo:hi], keys, values, scale=0.3, sliding_window=window,
                                   alibi_slopes=slopes)
        torch.testing.assert_close(got[lo:hi], want, atol=1e-5, rtol=1e-5)


def test_reference_matches_dense_causal_softmax():
    # The oracle itself against a from-scratch dense formula (one request, no paging).
    g = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(6, 2, 4, generator=g), torch.randn(6, 2, 4, generator=g),
                       torch.randn(6, 2, 4, generator=g))
    out = attention_reference(q, keys, values, scale=0.5)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    torch.testing.assert_close(out, want)
