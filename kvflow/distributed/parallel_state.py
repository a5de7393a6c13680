"""The tensor-parallel process group: the one piece of module-level state kvflow keeps.

With one worker nothing is initialised and every collective is the identity,
so single-process code pays nothing. Workers of a tensor-parallel engine call
``init_tensor_parallel`` once, before building the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    group: Optional[object]


_TP = TPGroup(rank=0, size=1, group=None)


def init_tensor_parallel(rank: int, size: int, backend: str, init_method: str) -> None:
    """Joins the process group of ``size`` ranks (NCCL on GPU, gloo on CPU)."""
    global _TP
    if size > 1:
        dist.init_process_group(backend=backend, init_method=init_method,
                                world_size=size, rank=rank)
        _TP = TPGroup(rank=rank, size=size, group=dist.group.WORLD)
    else:
        _TP = TPGroup(rank=0, size=1, group=None)


def destroy_tensor_parallel() -> None:
    global _TP
    if _TP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _TP = TPGroup(rank=0, size=1, group=None)


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums ``x`` over the ranks (in place when there are several)."""
    if _TP.size == 1:
        return x
    dist.all_reduce(x, group=_TP.group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates every rank's ``x`` along ``dim``."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)
