"""What the API process and the engine core process send each other (pickled, over pipes).

Outputs cross as tuples, not ``RequestOutput`` objects, and without what the
API process already holds. In the engine every output of a request refers to
the same prompt token list and the same ``RequestMetrics`` (whose
``token_times`` grows by one entry a token); pickled whole at every step,
those were most of the bytes: for 256 requests of 512-token prompts, 0.7 MB
and ~11 ms of pickling and unpickling per decode step, against 28 KB and
~0.5 ms without them (CPU, one core).
So ``OutputEncoder`` sends a request's prompt once, with its first output,
and of its metrics only the new token times; ``OutputDecoder`` rebuilds
outputs that again share one prompt list and one live ``RequestMetrics`` per
request, as the engine's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from kvflow.engine.engine_core import AddRequest, RequestFailure
from kvflow.engine.llm_engine import EngineStats
from kvflow.outputs import CompletionOutput, RequestMetrics, RequestOutput


# ---------------------------------------------------------------------------- to the core
@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class Shutdown:
    """Handle nothing after this: send the turn's outputs, shut the engine down, exit."""


@dataclass
class ProfileControl:
    """Start (or stop) torch.profiler in the engine's workers (``LLMEngine.start_profile``)."""

    start: bool


CoreRequest = Union[AddRequest, AbortRequests, Shutdown, ProfileControl]


# ---------------------------------------------------------------------------- from the core
WireOutput = tuple[Any, ...]
"""One ``RequestOutput`` as ``OutputEncoder.encode`` makes it."""


@dataclass
class CoreOutputs:
    """One turn of the core's loop: the outputs of its aborts and its step, the requests
    it failed (rejected ones included), and the engine's stats after it."""

    outputs: list[WireOutput]
    failures: dict[str, RequestFailure]
    stats: EngineStats


@dataclass
class CoreReady:
    """The engine is built; the loop is about to read its first message."""

    stats: EngineStats


@dataclass
class StartupFailed:
    """Building the engine raised; the process exits after sending this."""

    failure: RequestFailure


# ---------------------------------------------------------------------------- output codec
class OutputEncoder:
    """Core side: remembers, per unfinished request, how much of it was sent."""

    def __init__(self) -> None:
        self._num_times_sent: dict[str, int] = {}
        """Request id -> token times already sent; absent until its first output."""

    def encode(self, out: RequestOutput) -> WireOutput:
        sent = self._num_times_sent.get(out.request_id)
        # The prompt (and the arrival time) go with the first output only.
        first = None
        if sent is None:
            sent = 0
            first = (out.prompt, out.prompt_token_ids,
                     None if out.metrics is None else out.metrics.arrival_time)
        metrics = None
        if out.metrics is not None:
            m = out.metrics
            metrics = (m.first_scheduled_time, m.first_token_time, m.last_token_time,
                       m.finished_time, m.token_times[sent:])
            sent = len(m.token_times)
        if out.finished:
            self._num_times_sent.pop(out.request_id, None)
        else:
            self._num_times_sent[out.request_id] = sent
        completions = [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs,
                        c.finish_reason, c.stop_reason) for c in out.outputs]
        return (out.request_id, first, completions, out.finished, out.num_cached_tokens,
                out.prompt_logprobs, metrics)


@dataclass
class _RequestState:
    prompt: Optional[str]
    prompt_token_ids: list[int]
    metrics: Optional[RequestMetrics]


class OutputDecoder:
    """API side: ``RequestOutput``s again, from what ``OutputEncoder`` sent."""

    def __init__(self) -> None:
        self._requests: dict[str, _RequestState] = {}
        """Unfinished requests that had an output."""

    def decode(self, wire: WireOutput) -> RequestOutput:
        request_id, first, completions, finished, num_cached, prompt_logprobs, metrics = wire
        if first is not None:
            prompt, prompt_token_ids, arrival_time = first
            state = _RequestState(prompt, prompt_token_ids, None if arrival_time is None
                                  else RequestMetrics(arrival_time=arrival_time))
            self._requests[request_id] = state
        else:
            state = self._requests[request_id]
        if finished:
            del self._requests[request_id]
        if metrics is not None and state.metrics is not None:
            m = state.metrics
            (m.first_scheduled_time, m.first_token_time, m.last_token_time, m.finished_time,
             new_times) = metrics
            m.token_times.extend(new_times)
        return RequestOutput(
            request_id=request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=[CompletionOutput(*c) for c in completions], finished=finished,
            num_cached_tokens=num_cached, metrics=state.metrics)
