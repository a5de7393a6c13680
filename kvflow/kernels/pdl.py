"""Programmatic dependent launch (PDL) for the decode path's Triton kernels, on Hopper.

Why: at batch 1 a decode step is ~350 kernels of a few microseconds each, and between
two of them the GPU idles while the next kernel's programs are launched (an AWQ
Llama-2-7B step: 0.33 ms of 3.1 ms, benchmarks/RESULTS.md fifth session). On Hopper a
kernel can be launched while the one before it still runs: its programs start, then
block at ``griddepcontrol.wait`` until that predecessor has finished and its writes are
visible; and each kernel lets its successor launch as soon as all of its own programs
are running. Nothing is read or written before the wait, so results are unchanged.

    kernel A      |==== A's programs ====|
    kernel B (PDL)      |launch| wait .......|==== B's programs ====|

Every kvflow kernel that may be launched this way calls ``wait_for_predecessor`` first
(``USE_PDL`` constexpr, False compiles to nothing). Kernels of torch or cuBLAS in
between launch as usual and keep the plain stream order.

On by default for CUDA devices of compute capability 9.0 or newer (where this Triton
has the intrinsics); ``KVFLOW_PDL=0`` turns it off. Measured on an H100 (run 37,
benchmarks/RESULTS.md sixth session): L1 TPOT 5.33 -> 5.17 ms (bf16, Llama-2-7B shape)
and 3.37 -> 3.24 ms (its AWQ int4 checkpoint in float16), in the same run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvflow import envs


try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
    """Whether this Triton has the grid-dependency-control intrinsics PDL needs."""
except ImportError:
    HAS_GDC = False


@functools.lru_cache(maxsize=None)
def _supports(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def launch_options(device: torch.device) -> dict:
    """``{"launch_pdl": True}`` where kernels on ``device`` launch with PDL, else ``{}``:
    splice into a launch together with ``USE_PDL=bool(options)``."""
    if device.type != "cuda" or not HAS_GDC or not envs.pdl_enabled():
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"launch_pdl": True} if _supports(index) else {}


if HAS_GDC:
    @triton.jit
    def wait_for_predecessor(USE_PDL: tl.constexpr):
        """First statement of a kernel launched with ``launch_options``: wait until the
        kernel before it has finished (its writes visible), then let the kernel after it
        launch."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
else:
    @triton.jit
    def wait_for_predecessor(USE_PDL: tl.constexpr):
        """No PDL in this Triton: ``launch_options`` never asks for it."""
        pass
