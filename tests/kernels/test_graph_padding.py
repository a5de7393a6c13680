"""A step padded to a CUDA graph's shape computes what the unpadded step computes.

The graphs themselves need a GPU; what makes them correct does not: padding a step's
inputs to a graph key (``cuda_graphs.pad_inputs``) and running the model with the
graph's metadata (prefill tiles for any mix, extra requests with no token, padding
tokens with slot -1) must give the same hidden states for the real tokens and write the
same KV cache. Here on a tiny Llama with the Triton attention backend, for both graph
families (CPU: Triton's interpreter; GPU: the kernels the graphs capture).
"""

from __future__ import annotations

import pytest
import torch

from kvflow.attention.backends.triton import TritonAttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.config import EngineArgs
from kvflow.models.base import ModelContext
from kvflow.models.loader import load_model
from kvflow.worker.cuda_graphs import MIXED_QUERY_TILE, choose_graph, pad_inputs

BLOCK = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def model_and_cache(checkpoint):
    config = EngineArgs(model=checkpoint("llama"), dtype="float32",
                        attention_backend="torch").create_engine_config()
    mc = config.model_config
    backend = TritonAttentionBackend()
    model = load_model(mc, ModelContext(dtype=torch.float32, attn_backend=backend), DEVICE)
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, 60, BLOCK, mc.num_kv_heads, mc.head_dim, generator=gen).to(DEVICE)
              for _ in range(mc.num_layers)]
    return model, caches, backend


def _step(q_lens: list[int], seq_lens: list[int], vocab: int):
    """Host lists of a step: request b holds blocks 10b .. 10b+9 (shuffled per request)."""
    assert len(q_lens) <= 6, "the cache holds 60 blocks"
    gen = torch.Generator().manual_seed(1)
    ids, positions, slots, tables, query_start = [], [], [], [], [0]
    for b, (q, s) in enumerate(zip(q_lens, seq_lens)):
        table = (10 * b + torch.randperm(10, generator=gen)).tolist()[: -(-s // BLOCK)]
        tables.append(table)
        for p in range(s - q, s):
            ids.append(int(torch.randint(vocab, (1,), generator=gen)))
            positions.append(p)
            slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
        query_start.append(query_start[-1] + q)
    return ids, positions, slots, query_start, list(seq_lens), tables


def _metadata(t, qsl, seq_lens, tables, slots, max_query_len) -> AttentionMetadata:
    width = max(len(r) for r in tables)
    return AttentionMetadata(
        num_tokens=t, max_query_len=max_query_len, max_seq_len=max(seq_lens),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([r + [0] * (width - len(r)) for r in tables], dtype=torch.int32,
                                  device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE),
        query_start_loc_cpu=list(qsl), seq_lens_cpu=list(seq_lens))


@pytest.mark.parametrize("query_tile", [MIXED_QUERY_TILE, None])
@pytest.mark.parametrize("graph_splits", [1, 3])
@pytest.mark.parametrize("q_lens,seq_lens", [
    ([1, 7, 5], [20, 16, 5]),         # a decode, a prefill chunk, a whole prompt -> mixed graph
    ([1, 1, 1], [9, 1, 33]),          # decodes -> decode graph of 4
    ([3, 1, 12, 1, 2], [3, 8, 30, 14, 6]),
])
def test_padded_step_matches_unpadded(model_and_cache, q_lens, seq_lens, graph_splits,
                                      query_tile):
    """``graph_splits``: the split-KV factor the graph is captured with (decode and mixed);
    ``query_tile``: the query length a mixed graph's attention tiles are picked for."""
    model, caches, backend = model_and_cache
    vocab = model.lm_head.weight.shape[0] if hasattr(model, "lm_head") else 100
    ids, positions, slots, qsl, lens, tables = _step(q_lens, seq_lens, vocab)
    t, b = len(ids), len(lens)
    key = choose_graph(t, b, max(q_lens), decode_sizes=[1, 2, 4, 8], mixed_sizes=[8, 16, 32],
                       max_num_seqs=16)
    assert key is not None and key.mixed == (max(q_lens) > 1)
    assert key.num_tokens > t and key.num_reqs > b  # these cases do pad both

    with torch.inference_mode():
        ref_caches = [c.clone() for c in caches]
        expected = model(torch.tensor(ids, device=DEVICE), torch.tensor(positions, device=DEVICE),
                         ref_caches,
                         _metadata(t, qsl, lens, tables, slots, max(q_lens)))

        padded = pad_inputs(key, ids, positions, slots, qsl, lens, tables, pin=False)
        on = {name: getattr(padded, name).to(DEVICE) for name in
              ("input_ids", "positions", "slot_mapping", "seq_lens")}
        # The graph's block-table buffer: rows of padding requests hold what earlier steps
        # left there (here: other valid block ids), only the real rows are written.
        stale = torch.randint(0, 60, (key.num_reqs, padded.block_tables.shape[1] + 3),
                              dtype=torch.int32, generator=torch.Generator().manual_seed(5))
        stale[:b, :padded.block_tables.shape[1]] = padded.block_tables
        on["block_tables"] = stale.to(DEVICE)
        graph_qsl = (padded.query_start_loc.tolist() if key.mixed
                     else list(range(key.num_reqs + 1)))  # decode graphs keep an arange
        md = AttentionMetadata(
            num_tokens=key.num_tokens,
            max_query_len=(min(key.num_tokens, query_tile or key.num_tokens) if key.mixed else 1),
            max_seq_len=512, query_start_loc=torch.tensor(graph_qsl, dtype=torch.int32,
                                                          device=DEVICE),
            seq_lens=on["seq_lens"], block_tables=on["block_tables"],
            slot_mapping=on["slot_mapping"], query_start_loc_cpu=graph_qsl,
            seq_lens_cpu=padded.seq_lens.tolist(),
            decode_order=None if key.mixed else padded.decode_order.to(DEVICE))
        pad_caches = [c.clone() for c in caches]
        backend.num_kv_splits = graph_splits
        try:
            hidden = model(on["input_ids"], on["positions"], pad_caches, md)
        finally:
            backend.num_kv_splits = None

    assert hidden.shape[0] == key.num_tokens
    torch.testing.assert_close(hidden[:t], expected, atol=1e-5, rtol=1e-5)
    written = torch.zeros(caches[0].shape[1] * BLOCK, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    for got, want, before in zip(pad_caches, ref_caches, caches):
        flat = [c.view(2, -1, *c.shape[3:]) for c in (got, want, before)]
        # The real tokens' K/V match (matmuls of another row count may round differently) ...
        torch.testing.assert_close(flat[0][:, written], flat[1][:, written], atol=1e-5, rtol=1e-5)
        # ... and padding tokens (slot -1) wrote no other slot.
        assert torch.equal(flat[0][:, ~written], flat[2][:, ~written])


def test_pad_inputs_layout():
    key = choose_graph(5, 2, 4, decode_sizes=[1, 2], mixed_sizes=[8, 16], max_num_seqs=3)
    assert (key.mixed, key.num_tokens, key.num_reqs) == (True, 8, 3)
    p = pad_inputs(key, [7, 8, 9, 10, 11], [4, 0, 1, 2, 3], [4, 8, 9, 10, 11], [0, 1, 5], [5, 4],
                   [[1, 2], [2]], pin=False)
    assert p.input_ids.tolist() == [7, 8, 9, 10, 11, 0, 0, 0]
    assert p.slot_mapping.tolist() == [4, 8, 9, 10, 11, -1, -1, -1]
    assert p.query_start_loc.tolist() == [0, 1, 5, 5]  # the padding request has no token
    assert p.seq_lens.tolist() == [5, 4, 1]
    assert p.block_tables.tolist() == [[1, 2], [2, 0]]  # padding rows stay as they were
    decode = choose_graph(3, 3, 1, decode_sizes=[1, 2, 4], mixed_sizes=[8], max_num_seqs=4)
    p = pad_inputs(decode, [1, 2, 3], [5, 6, 7], [5, 6, 7], [0, 1, 2, 3], [6, 7, 8],
                   [[1, 2], [3, 4], [5, 6]], pin=False)
    assert p.query_start_loc is None and p.slot_mapping.tolist() == [5, 6, 7, -1]
    # Attention programs start longest context first, the padding request (one key) last.
    assert p.decode_order.tolist() == [2, 1, 0, 3]
    assert pad_inputs(key, [7, 8, 9, 10, 11], [4, 0, 1, 2, 3], [4, 8, 9, 10, 11], [0, 1, 5],
                      [5, 4], [[1, 2], [2]], pin=False).decode_order is None  # mixed: batch order


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_triton_backend_matches_torch_backend(checkpoint, family):
    """The Triton backend takes the layer's rotary into its KV write (one launch: q rotated
    in place, k on its way into the cache); the torch backend gets q and k rotated by the
    layer first. Same weights, same step: same hidden states and the same cache."""
    from kvflow.attention.backends.torch_ref import TorchAttentionBackend

    config = EngineArgs(model=checkpoint(family), dtype="float32",
                        attention_backend="torch").create_engine_config()
    mc = config.model_config
    outputs = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        assert backend.fuses_rotary == isinstance(backend, TritonAttentionBackend)
        model = load_model(mc, ModelContext(dtype=torch.float32, attn_backend=backend), DEVICE)
        gen = torch.Generator().manual_seed(0)
        caches = [torch.randn(2, 60, BLOCK, mc.num_kv_heads, mc.head_dim, generator=gen).to(DEVICE)
                  for _ in range(mc.num_layers)]
        ids, positions, slots, qsl, lens, tables = _step([1, 7, 5], [20, 16, 5], 100)
        with torch.inference_mode():
            hidden = model(torch.tensor(ids, device=DEVICE), torch.tensor(positions, device=DEVICE),
                           caches, _metadata(len(ids), qsl, lens, tables, slots, 7))
        outputs.append((hidden, caches))
    (h_torch, c_torch), (h_triton, c_triton) = outputs
    torch.testing.assert_close(h_triton, h_torch, atol=1e-5, rtol=1e-5)
    for got, want in zip(c_triton, c_torch):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
