"""The scheduler: one token budget per step, running requests first, then waiting ones.

Why one budget instead of prefill and decode phases: a step is a flat batch of
tokens, and a decode is just a request with one new token. Each step spends
``max_num_batched_tokens`` on, in order,

1. every running request's next tokens (1 for a decode, the rest of its
   prompt for a chunked prefill, cut to what the budget has left);
2. waiting requests, oldest first, after a prefix-cache lookup, their
   prompts split into chunks when they do not fit.

When the pool has no block left for a running request, the newest running
request is preempted: its blocks are freed and it goes back to the head of the
queue, to be recomputed later (cheap with prefix caching).

Progress is booked when a step is scheduled, not when it returns: scheduling
advances ``num_computed_tokens`` and, for a request whose step samples, counts
one pending token. That lets the engine schedule step N+1 while step N still
runs (asynchronous scheduling): a decode whose last token is still pending is
scheduled for that one token, which the worker takes from step N's sampled ids
on the GPU. A request known to end with its pending tokens (``max_tokens`` or
``max_model_len``) is not scheduled again; one that ends on a stop token costs
at most one wasted step, whose result is ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.request import Request, RequestStatus
from kvflow.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen yet (or see again after a preemption)."""

    req_id: str
    all_token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the workers already know: only what changed since its last step.

    No tokens: the only tokens a known request gains are the ones the workers
    sampled themselves, and they keep those.
    """

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """What one step computes; the workers' only input besides the weights."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    """Tokens each scheduled request computes this step, in batch order."""
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests that ended since the last step: workers drop their state."""
    preempted_req_ids: set[str] = field(default_factory=set)
    """Requests preempted this step: workers drop their state but keep their generator,
    so a seeded request draws the same samples whether or not it was preempted."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """What the workers return: one sampled token per request that reached its end."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, object] = field(default_factory=dict)
    """req_id -> (top ids, top logprobs, sampled rank) for requests asking logprobs."""
    prompt_logprobs: dict[str, object] = field(default_factory=dict)
    """req_id -> this chunk's prompt logprobs, for requests asking for them."""


@dataclass
class EngineCoreOutput:
    """The new tokens of one request after a step, and whether it ended."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    new_logprobs: Optional[object] = None
    new_prompt_logprobs: Optional[object] = None
    num_cached_tokens: int = 0


class Scheduler:
    """Decides, each step, which tokens of which requests to compute."""

    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 long_prefill_token_threshold: int = 0) -> None:
        self.max_num_seqs = max_num_seqs
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self._known_to_workers: set[str] = set()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use.")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Ends requests from outside (abort, or a stop string found by detokenizing)."""
        assert status.is_finished
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)

    def _free(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        if request.request_id in self._known_to_workers or request.num_preemptions:
            self._finished_ids.add(request.request_id)
            self._known_to_workers.discard(request.request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()

        def emit(request: Request, fresh_ids: list[int], num_tokens: int) -> None:
            req_id = request.request_id
            num_scheduled[req_id] = num_tokens
            if req_id not in self._known_to_workers:
                self._known_to_workers.add(req_id)
                new_reqs.append(NewRequestData(
                    req_id=req_id,
                    all_token_ids=list(request.all_token_ids),
                    num_prompt_tokens=request.num_prompt_tokens,
                    sampling_params=request.sampling_params,
                    block_ids=self.kv_cache_manager.block_ids(req_id),
                    num_computed_tokens=request.num_computed_tokens,
                ))
            else:
                cached_reqs.append(CachedRequestData(
                    req_id=req_id, new_block_ids=fresh_ids,
                    num_computed_tokens=request.num_computed_tokens))
            # Book the step now (see the module docstring): a step that reaches the end
            # of the known and pending tokens samples one more.
            request.num_computed_tokens += num_tokens
            if request.num_computed_tokens == request.num_tokens_with_pending:
                request.num_pending += 1

        # 1. Running requests, oldest first; preempt from the newest end.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(self._chunk(request.num_tokens_with_pending
                                      - request.num_computed_tokens), budget)
            if num_new <= 0 or self._ends_with_pending(request):
                i += 1
                continue
            fresh = self.kv_cache_manager.allocate_slots(request, num_new)
            while fresh is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
                fresh = self.kv_cache_manager.allocate_slots(request, num_new)
            if fresh is None:
                break
            emit(request, [b.block_id for b in fresh], num_new)
            budget -= num_new
            i += 1

        # 2. Waiting requests, unless this step had to preempt (no room to grow).
        skipped: list[Request] = []
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            parent = request.fork_parent
            if request.num_pending or (parent is not None and not parent.is_finished and
                                       parent.num_computed_tokens < parent.num_prompt_tokens):
                # A request preempted while its last step ran waits for that step's token;
                # a sibling of n > 1 waits for the shared prompt to be scheduled.
                skipped.append(self.waiting.popleft())
                continue
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            if not hits and parent is not None:
                hits, num_hit_tokens = self.kv_cache_manager.get_fork_blocks(request)
            num_new = min(self._chunk(request.num_tokens - num_hit_tokens), budget)
            fresh = self.kv_cache_manager.allocate_slots(request, num_new, hits)
            if fresh is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            emit(request, [b.block_id for b in fresh], num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

        finished = self._finished_ids
        self._finished_ids = set()
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            finished_req_ids=finished,
            preempted_req_ids=preempted,
        )

    def _chunk(self, num_tokens: int) -> int:
        """Caps one request's prompt chunk at ``long_prefill_token_threshold`` (if set)."""
        cap = self.long_prefill_token_threshold
        return min(num_tokens, cap) if cap > 0 else num_tokens

    def _ends_with_pending(self, request: Request) -> bool:
        """True if the pending tokens finish the request by length: nothing left to schedule."""
        return request.num_pending > 0 and (
            request.num_output_tokens + request.num_pending >= request.max_tokens
            or request.num_tokens_with_pending >= self.max_model_len)

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Workers drop its batch state (keeping its sampling generator, see
        # SchedulerOutput.preempted_req_ids); it comes back as a new request with all its tokens.
        self._known_to_workers.discard(request.request_id)
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ update
    def update_from_output(self, sched: SchedulerOutput,
                           model_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Appends the sampled tokens of a finished step and ends stopped requests.

        With asynchronous scheduling this runs after the next step was scheduled:
        a request may since have been preempted (it still takes its token) or
        ended (its token is dropped).
        """
        outputs: list[EngineCoreOutput] = []
        for req_id in sched.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            token = model_output.sampled_token_ids.get(req_id)
            prompt_lp = model_output.prompt_logprobs.get(req_id)
            if token is None:
                if prompt_lp is not None:
                    outputs.append(EngineCoreOutput(req_id, [], new_prompt_logprobs=prompt_lp,
                                                    num_cached_tokens=request.num_cached_tokens or 0))
                continue
            request.append_output_token(token)
            status, stop_reason = self._check_stop(request, token)
            out = EngineCoreOutput(
                req_id=req_id,
                new_token_ids=[token],
                new_logprobs=model_output.logprobs.get(req_id),
                new_prompt_logprobs=prompt_lp,
                num_cached_tokens=request.num_cached_tokens or 0,
            )
            if status is not None:
                request.stop_reason = stop_reason
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                else:
                    self.waiting.remove(request)
                request.status = status
                self._free(request)
                out.finish_reason = status.finish_reason
                out.stop_reason = stop_reason
            outputs.append(out)
        return outputs

    def _check_stop(self, request: Request, token: int
                    ) -> tuple[Optional[RequestStatus], Union[int, str, None]]:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens and token in params.all_stop_token_ids:
            # vLLM's convention: stop_reason is the id for a stop token, None for EOS.
            is_eos = token in params.eos_token_ids and token not in (params.stop_token_ids or [])
            return RequestStatus.FINISHED_STOPPED, (None if is_eos else token)
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def check_integrity(self) -> None:
        """Debug/test check: blocks conserved, every live request in exactly one queue."""
        self.kv_cache_manager.check_integrity()
        ids = [r.request_id for r in self.waiting] + [r.request_id for r in self.running]
        assert len(ids) == len(set(ids)) == len(self.requests), "request in two queues or lost"
        for req_id in self.kv_cache_manager.req_to_blocks:
            assert req_id in self.requests, f"finished request {req_id} still holds blocks"
