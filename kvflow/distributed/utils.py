"""Helpers shared by the tensor-parallel executors: layout checks, ports, per-rank setup.

Both executors (``mp`` and ``ray``) follow the same order, on the driver and
then on each rank:

    driver:  verify_tensor_parallel_layout ─► start N ranks ─► init_method
    rank r:  init_rank_environment (device, threads, TP group) ─► Worker(config, device)

The TP group must exist before the model is built, because every parallel
layer reads its rank and the group size when it is constructed.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch

from kvflow.distributed.parallel_state import init_tensor_parallel


def verify_tensor_parallel_layout(tensor_parallel_size: int, num_heads: int,
                                  num_kv_heads: int) -> None:
    """Raises ValueError unless ``tensor_parallel_size`` ranks can split the heads.

    Query heads split evenly. KV heads either split evenly too, or, when there
    are fewer of them than ranks, each one is replicated on
    ``tensor_parallel_size // num_kv_heads`` consecutive ranks (which needs the
    rank count to be a multiple of the KV head count).
    """
    tp = tensor_parallel_size
    if tp == 1:
        return
    if num_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide the model's {num_heads} attention "
            f"heads. Choose a divisor of {num_heads}.")
    if num_kv_heads >= tp and num_kv_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide the model's {num_kv_heads} KV heads. "
            f"Choose a divisor of {num_kv_heads} (or a multiple of it, up to {num_heads}).")
    if num_kv_heads < tp and tp % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} is larger than the model's {num_kv_heads} KV heads but "
            f"not a multiple of them, so they cannot be replicated evenly. Choose a multiple "
            f"of {num_kv_heads} that divides {num_heads}.")


def get_open_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; nothing is hard-coded).

    The port is released before the ranks bind it, so another process could
    take it in between; init then fails loudly on every rank, and the executor
    reports it, rather than two engines silently sharing a rendezvous.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def get_host_ip() -> str:
    """This machine's address as other machines of a Ray cluster see it."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - ray absent or not connected: best local guess
        return socket.gethostbyname(socket.gethostname())


def init_rank_environment(rank: int, world_size: int, device: torch.device,
                          init_method: str, num_threads: Optional[int] = None) -> None:
    """Prepares one rank's process: its device, its CPU threads, then the TP group.

    On CPU the ranks share the machine's cores, so each takes its share
    (``num_threads``, default cores // world_size): N ranks each spinning up
    every core would oversubscribe and run slower than one rank.
    """
    if device.type == "cuda":
        # Before NCCL init, so the communicator binds this rank's GPU, not GPU 0.
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        if num_threads is None:
            num_threads = max(1, available_cpus() // world_size)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    init_tensor_parallel(rank, world_size, backend=backend, init_method=init_method)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


__all__ = [
    "available_cpus",
    "get_host_ip",
    "get_open_port",
    "init_rank_environment",
    "verify_tensor_parallel_layout",
]
