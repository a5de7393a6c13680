"""The padded batch sizes that get a CUDA graph (captured only on GPU; the list is pure)."""

import pytest

from kvflow.worker.cuda_graphs import capture_sizes


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8, 100, 256, 300, 1024])
def test_capture_sizes_cover_every_batch(max_num_seqs):
    sizes = capture_sizes(max_num_seqs)
    assert sizes[0] == 1 and sizes == sorted(set(sizes))
    assert sizes[-1] == min(max_num_seqs, 256)
    # Every batch up to the largest captured size has a graph that holds it.
    for n in range(1, sizes[-1] + 1):
        assert any(s >= n for s in sizes)


def test_graph_split_kv_factor_falls_with_batch_size():
    """Graphs of large batches are captured without split-KV (each program keeps a long
    loop); small ones split 8 ways, up to 32 while that leaves < 2 programs per SM, so a
    lone decode at a long context still fills the SMs."""
    from kvflow.kernels.paged_attention import graph_num_kv_splits

    h100 = 132
    splits = [graph_num_kv_splits(bs, 8, h100) for bs in capture_sizes(256)]
    assert splits[:5] == [32, 17, 9, 8, 5] and splits[-1] == 1  # batch 1, 2, 4, 8, 16
    assert all(a >= b for a, b in zip(splits, splits[1:]))
    assert graph_num_kv_splits(64, 8, h100) == 1  # 512 programs fill 132 SMs twice
    assert graph_num_kv_splits(1, 32, h100) == 9  # MHA at batch 1: 32 programs, 4 waves short
    assert graph_num_kv_splits(1, 1, h100) == 32  # MQA: capped


@pytest.mark.parametrize("max_num_batched_tokens", [4, 8, 100, 512, 2048, 8192])
def test_mixed_capture_sizes(max_num_batched_tokens):
    from kvflow.worker.cuda_graphs import mixed_capture_sizes

    sizes = mixed_capture_sizes(max_num_batched_tokens)
    if max_num_batched_tokens < 8:
        assert sizes == []
        return
    assert sizes == sorted(set(sizes)) and sizes[0] == 8
    assert sizes[-1] == min(max_num_batched_tokens, 512)


def test_choose_graph_holds_every_step():
    """Every step a scheduler can form up to the largest mixed graph gets a graph that
    holds its tokens and requests; decode-only steps take the decode family while it
    holds them; larger steps run eagerly."""
    from kvflow.worker.cuda_graphs import choose_graph, mixed_capture_sizes

    max_num_seqs = 300
    decode, mixed = capture_sizes(max_num_seqs), mixed_capture_sizes(8192)
    for tokens in range(1, 600, 7):
        for reqs in {1, 2, min(tokens, 3), min(tokens, 97), min(tokens, max_num_seqs)}:
            for max_q in {1, 2, tokens - reqs + 1}:
                if max_q == 1 and reqs != tokens or max_q > tokens - reqs + 1 or max_q < 1:
                    continue  # not a possible step
                key = choose_graph(tokens, reqs, max_q, decode, mixed, max_num_seqs)
                if key is None:
                    assert tokens > 512 and not (max_q == 1 and reqs <= 256)
                    continue
                assert key.num_tokens >= tokens and key.num_reqs >= reqs
                assert key.mixed == (max_q > 1 or reqs > 256)
                if key.mixed:
                    assert key.num_tokens in mixed and key.num_reqs == min(key.num_tokens, max_num_seqs)
                    # the smallest that holds it
                    assert all(s < tokens for s in mixed if s < key.num_tokens)
                else:
                    assert key.num_tokens == key.num_reqs and key.num_reqs in decode
