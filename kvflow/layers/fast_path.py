"""When layers take their Triton kernels: on CUDA tensors, with Triton installed.

Every fused kernel has its torch twin in the layer itself (the CPU path and the
reference its tests compare against); this module only decides which runs.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_installed()
