"""TritonAttentionBackend against TorchAttentionBackend on a random paged cache."""

from __future__ import annotations

import pytest
import torch

from kvflow.attention.backends.base import create_attention_backend
from kvflow.attention.backends.torch_ref import TorchAttentionBackend
from kvflow.attention.backends.triton import TritonAttentionBackend

ON_GPU = torch.cuda.is_available()
Q_LENS = [1, 6, 20, 1, 0, 3]
SEQ_LENS = [17, 6, 52, 33, 16, 32]


def run_both(batch, *, num_kv_splits=None, **kwargs):
    """Both backends from the same stale cache: this step's slots hold NaN until written."""
    caches = []
    for source in (batch.kv_cache_ref, batch.kv_cache):
        cache = source.clone()
        num_blocks, block_size = cache.shape[1], cache.shape[2]
        cache.view(2, num_blocks * block_size, *cache.shape[3:])[:, batch.slot_mapping] = float("nan")
        caches.append(cache)
    cache_torch, cache_triton = caches
    metadata = batch.metadata()
    scale = batch.q.shape[-1] ** -0.5
    expected = TorchAttentionBackend().forward(batch.q, batch.k_new, batch.v_new, cache_torch, metadata,
                                               scale=scale, **kwargs)
    out = TritonAttentionBackend(num_kv_splits=num_kv_splits).forward(
        batch.q, batch.k_new, batch.v_new, cache_triton, metadata, scale=scale, **kwargs)
    flat = cache_triton.view(2, -1, *cache_triton.shape[3:])
    assert torch.equal(flat[0, batch.slot_mapping], batch.k_new)
    assert torch.equal(flat[1, batch.slot_mapping], batch.v_new)
    return out, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("window,alibi", [(None, False), (8, False), (None, True), (20, True)])
def test_matches_torch_backend(paged_batch, tol, device, dtype, heads, window, alibi):
    batch = paged_batch(Q_LENS, SEQ_LENS, num_heads=heads[0], num_kv_heads=heads[1], head_size=32,
                        block_size=16, dtype=dtype, sliding_window=window)
    slopes = torch.rand(heads[0], device=device) if alibi else None
    out, expected = run_both(batch, sliding_window=window, alibi_slopes=slopes)
    assert out.dtype == expected.dtype == dtype
    # The torch backend rounds its float32 result once: allow that on top of the kernel's error.
    torch.testing.assert_close(out.float(), expected.float(), **tol(dtype))


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_step(paged_batch, tol, num_kv_splits):
    batch = paged_batch([1, 1, 1, 1], [1, 16, 17, 40], num_heads=8, num_kv_heads=2, head_size=16,
                        block_size=16, dtype=torch.float32)
    out, expected = run_both(batch, num_kv_splits=num_kv_splits)
    torch.testing.assert_close(out, expected, **tol(torch.float32))


def test_factory_and_validation():
    assert isinstance(create_attention_backend("triton"), TritonAttentionBackend)
    with pytest.raises(ValueError, match="num_kv_splits"):
        TritonAttentionBackend(num_kv_splits=0)


@pytest.mark.skipif(not ON_GPU, reason="large shapes run on the GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_batch(paged_batch, tol, dtype):
    q_lens = [1] * 48 + [512, 2000, 37]
    seq_lens = [100 + 131 * i for i in range(48)] + [512, 6000, 1037]
    batch = paged_batch(q_lens, seq_lens, num_heads=32, num_kv_heads=8, head_size=128,
                        block_size=16, dtype=dtype)
    out, expected = run_both(batch)
    torch.testing.assert_close(out.float(), expected.float(), **tol(dtype))
