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
    loop); small ones split up to 8 ways so a lone decode still fills the SMs."""
    from kvflow.kernels.paged_attention import graph_num_kv_splits

    h100 = 132
    splits = [graph_num_kv_splits(bs, 8, h100) for bs in capture_sizes(256)]
    assert splits[0] == 8 and splits[-1] == 1
    assert all(a >= b for a, b in zip(splits, splits[1:]))
    assert graph_num_kv_splits(64, 8, h100) == 1  # 512 programs fill 132 SMs twice
    assert graph_num_kv_splits(1, 32, h100) == 8  # MHA at batch 1: 32 programs, 4 waves short
