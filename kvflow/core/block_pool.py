"""The pool of KV blocks: reference counts, an LRU free queue and the prefix-cache map.

A block is in exactly one of two states::

    ref_cnt > 0   in use by that many requests (never in the free queue)
    ref_cnt == 0  in the free queue; if it still has a hash it also sits in the
                  cache map and can be revived by a prefix hit until evicted

Allocation pops from the head of the free queue (least recently freed first)
and evicts the popped block's hash. Freed blocks go to the tail.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

from kvflow.core.request import BlockHash


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class BlockPool:
    """Owns every block; hands them out and takes them back. Pure Python."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_hits = 0
        self.num_queries = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (what /metrics reports as kv_cache_usage_perc)."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVBlock]:
        return self._cached.get(block_hash)

    # ------------------------------------------------------------------ changes
    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Takes ``num_blocks`` fresh blocks (ref_cnt 1) from the head of the free queue."""
        if num_blocks > len(self._free):
            raise ValueError(
                f"KV pool exhausted: {num_blocks} blocks asked, {len(self._free)} free of "
                f"{self.num_blocks}."
            )
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Adds a reference to blocks found in the cache (reviving free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference from each block; blocks reaching 0 join the free queue's tail.

        Callers pass a request's blocks in reverse order so that its last
        blocks (the least likely to be shared) are evicted first.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Registers a full block under its content key (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # same content already cached in another block; keep that one
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; only allowed when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    # ------------------------------------------------------------------ checks
    def check_integrity(self, expected_refs: Optional[dict[int, int]] = None) -> None:
        """Asserts conservation: free + in use == total, and the map matches the blocks."""
        in_use = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert in_use + len(self._free) == self.num_blocks, "block leaked or double counted"
        for block_id, block in self._free.items():
            assert block.ref_cnt == 0 and block.block_id == block_id
        for key, block in self._cached.items():
            assert block.block_hash == key, f"cache map points at {block} under a foreign key"
        if expected_refs is not None:
            for block in self.blocks:
                assert block.ref_cnt == expected_refs.get(block.block_id, 0), (
                    f"{block} has ref_cnt {block.ref_cnt}, expected "
                    f"{expected_refs.get(block.block_id, 0)}")
