"""Per-request block tables on top of the BlockPool, with prefix-cache lookups.

For a request with ``c`` computed tokens that schedules ``n`` more, the table
must cover ``c + n`` tokens::

    |<- computed (c) ->|<- new (n) ->|
    [ b0 ][ b1 ][ b2 ..][.. b3 ][ b4 ]      blocks needed = ceil((c + n) / S)
    ^ prefix hits (shared, touched)  ^ fresh blocks from the pool

Full blocks are registered in the pool's cache map as soon as they are
scheduled: the forward pass writes every layer's K/V before any attention
reads it, so another request of the same step may already share them.
"""

from __future__ import annotations

from typing import Optional

from kvflow.core.block_pool import BlockPool, KVBlock
from kvflow.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps request ids to their blocks; the scheduler's only door to the pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        self._num_hashed: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    # ------------------------------------------------------------------ lookup
    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request, in whole blocks.

        At least one token is always left to compute, since the step that
        computes the last prompt token also yields the logits to sample from.
        Requests asking for prompt logprobs get no hits (they need every logit).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.pool.num_queries += request.num_tokens
        self.pool.num_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def get_fork_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Full prompt blocks of ``request.fork_parent`` (n > 1 sharing one prompt)."""
        parent = request.fork_parent
        if parent is None or parent.request_id not in self.req_to_blocks:
            return [], 0
        num_full = min((request.num_tokens - 1) // self.block_size,
                       parent.num_computed_tokens // self.block_size,
                       request.num_prompt_tokens // self.block_size)
        blocks = self.req_to_blocks[parent.request_id][:num_full]
        return list(blocks), len(blocks) * self.block_size

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, request: Request, num_new_tokens: int,
                     new_computed_blocks: Optional[list[KVBlock]] = None) -> bool:
        return self._num_blocks_to_take(request, num_new_tokens, new_computed_blocks or []) \
            <= self.pool.num_free_blocks

    def _num_blocks_to_take(self, request: Request, num_new_tokens: int,
                            new_computed_blocks: list[KVBlock]) -> int:
        held = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        needed = cdiv(num_computed + num_new_tokens, self.block_size)
        fresh = max(0, needed - len(held) - len(new_computed_blocks))
        # Reviving a free cached block takes it out of the free queue too.
        revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        return fresh + revived

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Optional[list[KVBlock]] = None
                       ) -> Optional[list[KVBlock]]:
        """Grows the request's table to hold ``num_new_tokens`` more tokens.

        ``new_computed_blocks`` are prefix hits found for a request that holds
        no blocks yet; they are shared (ref count + 1). Returns the blocks
        taken fresh from the pool, or None (and changes nothing) if they do not
        fit. The caller advances ``request.num_computed_tokens`` itself.
        """
        computed = new_computed_blocks or []
        if self._num_blocks_to_take(request, num_new_tokens, computed) > self.pool.num_free_blocks:
            return None
        held = self.req_to_blocks.setdefault(request.request_id, [])
        if computed:
            assert not held, "prefix hits are only taken by a request holding no blocks"
            self.pool.touch(computed)
            held.extend(computed)
        num_total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        needed = cdiv(num_total, self.block_size)
        fresh = self.pool.allocate(max(0, needed - len(held)))
        held.extend(fresh)
        self._cache_full_blocks(request, held, num_total)
        return fresh

    def _cache_full_blocks(self, request: Request, held: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        start = self._num_hashed.get(request.request_id, 0)
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(start, num_full):
            self.pool.cache_block(held[i], request.block_hashes[i])
        self._num_hashed[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        """Returns every block of the request (last block first) to the pool."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_hashed.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def check_integrity(self) -> None:
        """Pool conservation plus: ref counts equal the number of tables holding each block."""
        refs: dict[int, int] = {}
        for blocks in self.req_to_blocks.values():
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        self.pool.check_integrity(refs)
