"""A request as the scheduler sees it: tokens, progress, blocks' hashes and status."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from kvflow.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> Optional[str]:
        return self.value if self.is_finished else None


BlockHash = tuple[int, tuple[int, ...]]
"""(hash of the parent block's key, this block's tokens): exact dict key, chained."""


class Request:
    """One sequence to generate. ``n > 1`` is fanned out into one Request per sample.

    ``num_computed_tokens`` counts tokens whose K/V sit in the cache, or will
    once the steps already scheduled have run (the scheduler advances it when
    it schedules, not when the step returns). ``num_pending`` counts tokens
    being sampled by scheduled steps whose results have not come back: with
    asynchronous scheduling the next step computes such a token's K/V before
    the host knows its value (the worker feeds it from the GPU)::

        all_token_ids (known)            pending
        [ p0 p1 ... pk  o0 o1 ... oj ] [ ? ]
        |<------- computed ------------------>|   after a decode is scheduled

    A preempted request drops its blocks and starts again from 0 (recompute):
    its outputs so far are simply more tokens to prefill.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: "SamplingParams",
        *,
        max_tokens: int,
        block_size: int,
        arrival_time: Optional[float] = None,
        fork_parent: Optional["Request"] = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.block_size = block_size
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.fork_parent = fork_parent
        """For the 2nd..n-th sample: waits for this request's prompt, then shares its blocks."""
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending = 0
        self.num_cached_tokens: Optional[int] = None
        """Prompt tokens found in the prefix cache at first schedule."""
        self.num_preemptions = 0
        self.stop_reason: Union[int, str, None] = None
        self.block_hashes: list[BlockHash] = []
        self._update_block_hashes()

    # ------------------------------------------------------------------ tokens
    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        """Adds a sampled token; it was pending since the step that sampled it was scheduled."""
        self.num_pending -= 1
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        """Extends the chain of full-block keys as tokens arrive."""
        size = self.block_size
        while (len(self.block_hashes) + 1) * size <= len(self.all_token_ids):
            i = len(self.block_hashes)
            parent = hash(self.block_hashes[-1]) if self.block_hashes else 0
            self.block_hashes.append((parent, tuple(self.all_token_ids[i * size:(i + 1) * size])))

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_tokens}, pending={self.num_pending}, "
                f"computed={self.num_computed_tokens})")
