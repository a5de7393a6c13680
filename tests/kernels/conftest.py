"""Kernel tests: Triton on the GPU when there is one, else Triton's CPU interpreter.

Shape letters: T = tokens, B = requests, H = query heads, Hkv = KV heads,
D = head size, N = cache blocks, S = block size, P = max blocks per request.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

# The interpreter is chosen when a kernel is decorated (at import of kvflow.kernels.*),
# so the flag must be set before any test module imports them.
if not torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET") != "1" and any(
        name.startswith("kvflow.kernels.") and name != "kvflow.kernels.ref" for name in sys.modules
    ):
        raise RuntimeError("kvflow.kernels was imported before tests/kernels/conftest.py could set "
                           "TRITON_INTERPRET=1; set it in the environment or run the kernel tests "
                           "in their own pytest process.")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton  # noqa: E402,F401  (a test dependency: fail loudly if missing, never skip)

from kvflow.attention.metadata import AttentionMetadata  # noqa: E402

# Test modules define their own ``ON_GPU = torch.cuda.is_available()`` for parametrize
# lists (a conftest is not importable by name: tests/conftest.py is "conftest" too).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class PagedBatch:
    """A random flat batch over a paged cache with shuffled block tables.

    ``kv_cache_ref`` holds finite values everywhere; ``kv_cache`` is the same cache with
    every slot no query may read (past each request's length, in spare blocks, and --
    with a window -- in blocks wholly below the window) set to NaN, so a kernel that
    reads one shows NaN.
    """

    q: torch.Tensor  # [T, H, D]
    k_new: torch.Tensor  # [T, Hkv, D]: this step's keys (already in the caches)
    v_new: torch.Tensor
    kv_cache: torch.Tensor  # [2, N, S, Hkv, D], poisoned
    kv_cache_ref: torch.Tensor  # [2, N, S, Hkv, D], clean
    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, P]
    slot_mapping: torch.Tensor  # int64 [T]
    max_query_len: int
    max_seq_len: int

    def metadata(self) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=self.q.shape[0],
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            slot_mapping=self.slot_mapping,
            query_start_loc_cpu=self.query_start_loc.tolist(),
            seq_lens_cpu=self.seq_lens.tolist(),
        )


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    sliding_window: Optional[int] = None,
    seed: int = 0,
) -> PagedBatch:
    assert len(q_lens) == len(seq_lens) and all(0 <= q <= s for q, s in zip(q_lens, seq_lens))
    gen = torch.Generator().manual_seed(seed)  # small host-side choices
    gen_data = torch.Generator(device=DEVICE).manual_seed(seed)  # the cache is made where it is used
    num_reqs = len(q_lens)
    pages = [-(-s // block_size) for s in seq_lens]
    max_pages = max(pages) + 1  # one padding column past every request's end
    num_blocks = sum(pages) + 3  # spare blocks nobody owns
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=gen_data,
                        device=DEVICE)
    perm = torch.randperm(num_blocks, generator=gen)
    spare = perm[sum(pages):]
    block_tables = torch.empty(num_reqs, max_pages, dtype=torch.int32)
    readable = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=DEVICE)
    slots = []
    start = 0
    for b, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        owned = perm[start:start + pages[b]]
        start += pages[b]
        # Padding entries point at a spare (poisoned) block, as a stale table would.
        block_tables[b] = spare[b % len(spare)]
        block_tables[b, :pages[b]] = owned
        lowest = 0
        if sliding_window is not None:
            # Blocks wholly below the first new token's window may be freed and reused.
            lowest = max(0, seq_len - q_len - sliding_window + 1) // block_size * block_size
        pos = torch.arange(lowest, seq_len)
        readable[owned[pos // block_size].to(DEVICE), (pos % block_size).to(DEVICE)] = True
        pos = torch.arange(seq_len - q_len, seq_len)
        slots.append(owned[pos // block_size] * block_size + pos % block_size)
    cache = cache.to(dtype)
    poisoned = cache.clone()
    poisoned[:, ~readable] = float("nan")
    slot_mapping = torch.cat(slots).to(torch.int64).to(DEVICE)
    flat = cache.view(2, num_blocks * block_size, num_kv_heads, head_size)
    k_new, v_new = flat[0, slot_mapping].clone(), flat[1, slot_mapping].clone()
    q = torch.randn(sum(q_lens), num_heads, head_size, generator=gen_data, device=DEVICE).to(dtype)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return PagedBatch(
        q=q, k_new=k_new, v_new=v_new, kv_cache=poisoned, kv_cache_ref=cache,
        query_start_loc=query_start_loc.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE), slot_mapping=slot_mapping,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
    )


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def tol():
    """tol(dtype) -> atol/rtol kwargs for kernel output vs a float32 reference."""
    table = {
        torch.float32: dict(atol=1e-4, rtol=1e-4),
        torch.float16: dict(atol=3e-3, rtol=3e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }
    return table.__getitem__


@pytest.fixture
def paged_batch():
    """make_paged_batch(q_lens, seq_lens, num_heads=, num_kv_heads=, head_size=, block_size=, dtype=)."""
    return make_paged_batch
