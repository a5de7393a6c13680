"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from kvflow.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*V/tp, (rank+1)*V/tp) live on ``rank``; out-of-slice ids give 0, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype),
                                   requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = loaded[self.vocab_start:self.vocab_start + self.shard_size]
        param.data.zero_()
        if rows.shape[1] != param.shape[1]:
            raise ValueError(f"embedding of width {rows.shape[1]} does not fit {param.shape[1]}.")
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden @ W.T per vocab slice, gathered to full-vocabulary logits."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 bias: bool = False) -> None:
        super().__init__(vocab_size, hidden_size, dtype)
        self.bias: Optional[nn.Parameter] = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.shard_size, dtype=dtype), requires_grad=False)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, self.bias)  # Triton GEMV at decode on CUDA
        logits = tp_all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
