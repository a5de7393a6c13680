"""CUDA graphs for whole forward passes: decode-only steps and mixed prefill/decode steps.

Why: at batch 1 a decode step of an 8B model is ~300 kernel launches; launched
one by one from Python the GPU waits on the CPU (BENCHMARKS.md: 15.3 ms eager
against 6.7 ms captured). A step that carries a prefill chunk is no different:
eager, it is launch-bound at ~15 ms while its GPU work takes 6-8 ms, so under
serving load (S1) every step with a new prompt in it stretched the decodes'
inter-token time. Graphs are captured once at start-up and replayed with the
step's inputs copied into persistent buffers. Two families::

    decode   key = padded batch size   1 2 4 8 16 24 32 48 ... max_num_seqs
             one token per request: a batch of 13 decodes runs the 16-graph;
             rows 13..15 are padding (slot -1: no KV write, seq_len 1, output ignored)

    mixed    key = padded token count  8 16 32 48 64 96 128 160 ... 384 512
             any mix of prefill chunks and decodes: 3 decodes + a 70-token chunk
             (73 tokens, 4 requests) run the 96-graph, captured for 96 requests:
               tokens   | 73 real tokens | 23 padding (slot -1)      |
               requests | 4 real         | 92 with no token (q_len 0) |
             query_start_loc = [0, 1, 2, 3, 73, 73, 73, ...]

The Triton attention kernel makes this possible: its grid depends only on the
token and request counts, and it reads every length from device tensors, so a
padded request with no token exits at once and a padding token (past
``query_start_loc[B]``) is never attended. Every other layer works row by row,
so padding rows only cost their FLOPs. Steps of more tokens than the largest
mixed graph are compute-bound and run eagerly. Only the Triton backend is
captured: the torch reference shapes its work on the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from kvflow.attention.metadata import AttentionMetadata, longest_first
from kvflow.models.base import CausalLM

if TYPE_CHECKING:  # Triton is only needed (and maybe only installed) on CUDA machines
    from kvflow.attention.backends.triton import TritonAttentionBackend

logger = logging.getLogger("kvflow")


# Padded batch sizes with a decode graph. A decode step reads every weight once whatever
# its batch, so padding up to the next size costs little; each size captured costs start-up
# time (C1 in benchmarks/RESULTS.md), so the list thins out as batches grow.
_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256)

# Padded token counts with a mixed graph. Up to ~300 tokens an 8B step still reads more
# bytes of weights than it computes FLOPs (H100: ~300 FLOP/byte), so padding is nearly
# free; above, a step is compute-bound, its launches hide behind the GPU work, and padding
# would cost real time: the list stops at 512. Steps of a prefill chunk plus a few dozen
# decodes (S1 with a 128-token cap: ~150 tokens) fall between the sizes, hence the steps of
# 32 there. Benchmarks empty the tuple for an A/B (gpu_suite.py --no-mixed-graphs).
_MIXED_SIZES: tuple[int, ...] = (8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)


# How a mixed graph's attention is launched (benchmarks/step_times.py measured the
# alternatives, RESULTS.md): tiles picked for 16-token queries (Llama-3-8B: 64-row tiles
# of 16 tokens x 4 heads) rather than for the graph's token count (128-row tiles), since
# most requests in a mixed step are decodes that fill 4 rows of a tile; and no split-KV
# (its reduce pass over every token costs more than the extra parallelism brings).
# None as the query tile: the graph's token count.
MIXED_QUERY_TILE: Optional[int] = 16
MIXED_KV_SPLITS = 1


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes of the decode graphs: every batch up to the last has one that holds it."""
    sizes = [s for s in _CAPTURE_SIZES if s <= max_num_seqs]
    if not sizes or sizes[-1] < min(max_num_seqs, _CAPTURE_SIZES[-1]):
        sizes.append(min(max_num_seqs, _CAPTURE_SIZES[-1]))
    return sizes


def mixed_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    """Token counts of the mixed graphs (none when a step holds fewer than 8 tokens)."""
    if not _MIXED_SIZES:
        return []
    cap = min(max_num_batched_tokens, _MIXED_SIZES[-1])
    sizes = [s for s in _MIXED_SIZES if s <= cap]
    if sizes and sizes[-1] < cap:
        sizes.append(cap)
    return sizes


@dataclass(frozen=True)
class GraphKey:
    """Which graph runs a step: its kind and the padded token / request counts."""

    mixed: bool
    num_tokens: int
    num_reqs: int


def choose_graph(num_tokens: int, num_reqs: int, max_query_len: int, decode_sizes: list[int],
                 mixed_sizes: list[int], max_num_seqs: int) -> Optional[GraphKey]:
    """The smallest graph that holds the step, or None (the step runs eagerly).

    Decode-only steps prefer a decode graph (its attention tiles fit one token per
    request); a decode-only batch larger than the largest decode graph, and every step
    with a prefill chunk, take a mixed graph if one holds its tokens.
    """
    if max_query_len == 1 and decode_sizes and num_reqs <= decode_sizes[-1]:
        bs = next(s for s in decode_sizes if s >= num_reqs)
        return GraphKey(False, bs, bs)
    if mixed_sizes and num_tokens <= mixed_sizes[-1]:
        size = next(s for s in mixed_sizes if s >= num_tokens)
        # Every request brings >= 1 token, so min(size, max_num_seqs) rows always suffice.
        return GraphKey(True, size, min(size, max_num_seqs))
    return None


@dataclass
class PaddedInputs:
    """A step's inputs padded on the host to a graph's shape (pinned on CUDA)."""

    input_ids: torch.Tensor  # long [T_pad]
    positions: torch.Tensor  # long [T_pad]
    slot_mapping: torch.Tensor  # long [T_pad], -1 past the real tokens
    seq_lens: torch.Tensor  # int32 [B_pad]
    block_tables: torch.Tensor  # int32 [B, P']: the real requests' rows only
    query_start_loc: Optional[torch.Tensor]  # int32 [B_pad + 1]; None for decode graphs
    decode_order: Optional[torch.Tensor] = None  # int32 [B_pad]; decode graphs only


def pad_inputs(key: GraphKey, input_ids: list[int], positions: list[int], slots: list[int],
               query_start: list[int], seq_lens: list[int], tables: list[list[int]],
               pin: bool) -> PaddedInputs:
    """Pads a step's host lists to ``key``'s shape; the layouts are drawn in the module doc.

    Decode graphs keep ``query_start_loc = arange`` in their buffer, so a padding request
    there owns one padding token (seq_len 1, slot -1); mixed graphs give padding requests
    no token at all (``query_start_loc`` repeats the real token count). Block-table rows
    of padding requests are not sent: the buffer keeps what earlier steps wrote there (block
    ids of the pool, or the zeros of capture), which a decode padding row reads one key of
    and a mixed padding request never reads. So a step uploads [B, P'], not [B_pad, P'].
    A decode graph's attention starts its requests longest first (``decode_order``), the
    padding (one key each) last.
    """
    num_tokens, num_reqs = len(input_ids), len(seq_lens)
    assert num_tokens <= key.num_tokens and num_reqs <= key.num_reqs, (key, num_tokens, num_reqs)
    extra_t = key.num_tokens - num_tokens
    extra_b = key.num_reqs - num_reqs
    width = max(len(t) for t in tables)
    table_rows = [t + [0] * (width - len(t)) for t in tables]
    qsl = order = None
    if key.mixed:
        qsl = torch.tensor(query_start + [num_tokens] * extra_b, dtype=torch.int32, pin_memory=pin)
    else:
        order = torch.tensor(longest_first(seq_lens) + list(range(num_reqs, key.num_reqs)),
                             dtype=torch.int32, pin_memory=pin)
    return PaddedInputs(
        input_ids=torch.tensor(input_ids + [0] * extra_t, dtype=torch.long, pin_memory=pin),
        positions=torch.tensor(positions + [0] * extra_t, dtype=torch.long, pin_memory=pin),
        slot_mapping=torch.tensor(slots + [-1] * extra_t, dtype=torch.long, pin_memory=pin),
        seq_lens=torch.tensor(seq_lens + [1] * extra_b, dtype=torch.int32, pin_memory=pin),
        block_tables=torch.tensor(table_rows, dtype=torch.int32, pin_memory=pin),
        query_start_loc=qsl, decode_order=order)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor


class CUDAGraphRunner:
    """Captures the model's forward per graph key; replays the one that holds a step."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, block_size: int,
                 device: torch.device, attn_backend: TritonAttentionBackend,
                 num_kv_heads: int) -> None:
        self.model = model
        self.attn_backend = attn_backend
        self.num_kv_heads = num_kv_heads
        self.kv_caches = kv_caches
        self.max_num_seqs = max_num_seqs
        self.sizes = capture_sizes(max_num_seqs)
        self.mixed_sizes = mixed_capture_sizes(max_num_batched_tokens)
        self.max_model_len = max_model_len
        self.device = device
        self.max_blocks = -(-max_model_len // block_size)
        keys = [GraphKey(False, s, s) for s in self.sizes]
        keys += [GraphKey(True, s, min(s, max_num_seqs)) for s in self.mixed_sizes]
        # Largest first: the smaller graphs then reuse the pool memory of the larger ones.
        self.keys = sorted(keys, key=lambda k: (k.num_tokens, k.num_reqs), reverse=True)
        max_t = max(k.num_tokens for k in keys)
        max_b = max(k.num_reqs for k in keys)
        self.input_ids = torch.zeros(max_t, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_t, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_t,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_b, dtype=torch.int32, device=device)
        self.decode_qsl = torch.arange(max_b + 1, dtype=torch.int32, device=device)
        self.mixed_qsl = torch.zeros(max_b + 1, dtype=torch.int32, device=device)
        self.decode_order = torch.arange(max_b, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_b, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[GraphKey, _Graph] = {}
        self.mixed_kv_splits = MIXED_KV_SPLITS
        self.mixed_query_tile: Optional[int] = MIXED_QUERY_TILE
        self.replays = {"decode": 0, "mixed": 0}
        """Steps replayed per graph family (tests and benchmarks read it)."""

    def _metadata(self, key: GraphKey) -> AttentionMetadata:
        t, b = key.num_tokens, key.num_reqs
        qsl = self.mixed_qsl if key.mixed else self.decode_qsl
        # max_query_len only picks the attention tiles: a mixed graph keeps prefill tiles,
        # right for any query lengths up to its token count.
        mixed_q = t if self.mixed_query_tile is None else min(t, self.mixed_query_tile)
        return AttentionMetadata(
            num_tokens=t, max_query_len=mixed_q if key.mixed else 1, max_seq_len=self.max_model_len,
            query_start_loc=qsl[: b + 1], seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:t],
            query_start_loc_cpu=[0] * (b + 1) if key.mixed else list(range(b + 1)),
            seq_lens_cpu=[1] * b, decode_order=None if key.mixed else self.decode_order[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        from kvflow.kernels.paged_attention import graph_num_kv_splits, num_sms

        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        backend = self.attn_backend
        # Warm-ups run for real: start from the capture state (no request has a token, no
        # slot is written), not from whatever an earlier replay left in the buffers.
        self.slot_mapping.fill_(-1)
        self.mixed_qsl.zero_()
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        self.positions.zero_()
        self.decode_order.copy_(torch.arange(len(self.decode_order), device=self.device))
        for key in self.keys:
            # A replay keeps the split-KV factor of its capture: pin one per decode batch
            # size (mixed steps never split: their prefill q-blocks fill the SMs).
            backend.num_kv_splits = self.mixed_kv_splits if key.mixed else graph_num_kv_splits(
                key.num_reqs, self.num_kv_heads, num_sms(self.device))
            md = self._metadata(key)
            args = (self.input_ids[:key.num_tokens], self.positions[:key.num_tokens],
                    self.kv_caches, md)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model(*args)  # warm up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
            self.graphs[key] = _Graph(graph, hidden)
        backend.num_kv_splits = None  # eager steps choose from each step's lengths
        # A graph's first replay uploads it to the device: do that here, at the capture
        # state (no slot written), rather than in the first serving step that needs it.
        for entry in self.graphs.values():
            entry.graph.replay()
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s and mixed steps of %s tokens",
                    self.sizes, self.mixed_sizes)

    def choose(self, num_tokens: int, num_reqs: int, max_query_len: int) -> Optional[GraphKey]:
        if not self.graphs:
            return None
        return choose_graph(num_tokens, num_reqs, max_query_len, self.sizes, self.mixed_sizes,
                            self.max_num_seqs)

    @torch.inference_mode()
    def run(self, key: GraphKey, inputs: PaddedInputs,
            fill: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Replays ``key``'s graph on inputs padded to its shape; returns hidden [T_pad, hidden].

        The inputs are host tensors (pinned on CUDA, so the copies do not wait for the
        GPU); ``fill`` = (rows, ids) on the device overwrites those rows of ``input_ids``
        after the copy: tokens still being sampled by the previous step, taken straight
        from its output.
        """
        t, b = key.num_tokens, key.num_reqs
        self.input_ids[:t].copy_(inputs.input_ids, non_blocking=True)
        if fill is not None:
            self.input_ids.index_copy_(0, fill[0], fill[1])
        self.positions[:t].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:t].copy_(inputs.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(inputs.seq_lens, non_blocking=True)
        rows, width = inputs.block_tables.shape
        self.block_tables[:rows, :width].copy_(inputs.block_tables, non_blocking=True)
        if key.mixed:
            assert inputs.query_start_loc is not None
            self.mixed_qsl[: b + 1].copy_(inputs.query_start_loc, non_blocking=True)
        else:
            assert inputs.decode_order is not None
            self.decode_order[:b].copy_(inputs.decode_order, non_blocking=True)
        entry = self.graphs[key]
        entry.graph.replay()
        self.replays["mixed" if key.mixed else "decode"] += 1
        return entry.hidden
