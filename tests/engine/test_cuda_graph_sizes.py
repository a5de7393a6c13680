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
