"""CUDA graphs for decode-only steps.

Why: at batch 1 a decode step of an 8B model is ~300 kernel launches; launched
one by one from Python the GPU waits on the CPU (BENCHMARKS.md: 15.3 ms eager
against 6.7 ms captured). The graphs are captured once at start-up for a set of
padded batch sizes and replayed with the step's inputs copied into persistent
buffers::

    sizes 1 2 4 8 16 24 32 48 ... max_num_seqs     a batch of 13 decodes runs the 16-graph;
    rows 13..15 are padding: slot -1 (no KV write), seq_len 1, output ignored

Only the Triton backend is captured: it reads lengths from device tensors and
launches a fixed grid, where the torch reference shapes its work on the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from kvflow.attention.metadata import AttentionMetadata
from kvflow.models.base import CausalLM

if TYPE_CHECKING:  # Triton is only needed (and maybe only installed) on CUDA machines
    from kvflow.attention.backends.triton import TritonAttentionBackend

logger = logging.getLogger("kvflow")


# Padded batch sizes with a graph. A decode step reads every weight once whatever its
# batch, so padding up to the next size costs little; each size captured costs start-up
# time (C1 in benchmarks/RESULTS.md), so the list thins out as batches grow.
_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in _CAPTURE_SIZES if s <= max_num_seqs]
    if not sizes or sizes[-1] < min(max_num_seqs, _CAPTURE_SIZES[-1]):
        sizes.append(min(max_num_seqs, _CAPTURE_SIZES[-1]))
    return sizes


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor


class CUDAGraphRunner:
    """Captures the model's decode forward per padded batch size; replays it per step."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], *, max_num_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device,
                 attn_backend: TritonAttentionBackend, num_kv_heads: int) -> None:
        self.model = model
        self.attn_backend = attn_backend
        self.num_kv_heads = num_kv_heads
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        self.device = device
        self.max_blocks = -(-max_model_len // block_size)
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, _Graph] = {}

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=bs, max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs)

    @torch.inference_mode()
    def capture(self) -> None:
        from kvflow.kernels.paged_attention import graph_num_kv_splits, num_sms

        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        backend = self.attn_backend
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            # A replay keeps the split-KV factor of its capture: pin one per batch size.
            backend.num_kv_splits = graph_num_kv_splits(bs, self.num_kv_heads,
                                                        num_sms(self.device))
            md = self._metadata(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, md)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model(*args)  # warm up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
            self.graphs[bs] = _Graph(graph, hidden)
        backend.num_kv_splits = None  # eager steps choose from each step's lengths
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, num_reqs: int, max_query_len: int) -> bool:
        return max_query_len == 1 and num_reqs <= self.max_bs and bool(self.graphs)

    def padded_size(self, num_reqs: int) -> int:
        return next(s for s in self.sizes if s >= num_reqs)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor,
            fill: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Replays the smallest graph that holds the batch; returns hidden [n, hidden].

        The inputs are host tensors (pinned on CUDA, so the copies do not wait
        for the GPU); ``fill`` = (rows, ids) on the device overwrites those
        rows of ``input_ids`` after the copy: tokens still being sampled by the
        previous step, taken straight from its output.
        """
        n = input_ids.shape[0]
        bs = self.padded_size(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        if fill is not None:
            self.input_ids.index_copy_(0, fill[0], fill[1])
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slots, non_blocking=True)
        self.slot_mapping[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.seq_lens[n:bs].fill_(1)
        width = block_tables.shape[1]
        self.block_tables[:n, :width].copy_(block_tables, non_blocking=True)
        entry = self.graphs[bs]
        entry.graph.replay()
        return entry.hidden[:n]
