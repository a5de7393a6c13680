"""EngineCore: an ``LLMEngine`` that reports failures per request instead of raising.

Both ways of serving asynchronously drive the engine through this class: the
engine core process (core_proc.py) and the in-process client's worker thread
(core_client.py). It keeps the one piece of state they need beyond the
engine's own, the ids of the requests the engine holds, so that a failing
step can fail exactly those.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from kvflow.engine.llm_engine import EngineStats, LLMEngine, PromptType
from kvflow.engine.output_processor import RequestOutputKind
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger("kvflow.engine")


@dataclass
class RequestFailure:
    """Why a request ended without a final output."""

    message: str
    is_bad_input: bool
    """True: ``add_request`` rejected it (its ValueError: the client's 400); else an engine
    fault."""

    def to_exception(self) -> Exception:
        return ValueError(self.message) if self.is_bad_input else RuntimeError(self.message)


@dataclass
class AddRequest:
    """``LLMEngine.add_request``'s arguments."""

    request_id: str
    prompt: PromptType
    params: Optional[SamplingParams]
    arrival_time: Optional[float]
    output_kind: RequestOutputKind


class EngineCore:
    """Wraps one engine; not thread-safe (one driver calls it at a time)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.request_ids: set[str] = set()
        """Requests the engine holds: the ones a failing step fails."""

    def profile(self, start: bool) -> None:
        """``LLMEngine.start_profile`` (or ``stop_profile``); their RuntimeErrors pass through."""
        if start:
            self.engine.start_profile()
        else:
            self.engine.stop_profile()

    def add_request(self, req: AddRequest) -> Optional[RequestFailure]:
        """Queues the request; returns why not if the engine rejected it (nothing queued)."""
        try:
            self.engine.add_request(req.request_id, req.prompt, req.params,
                                    arrival_time=req.arrival_time, output_kind=req.output_kind)
        except ValueError as exc:
            return RequestFailure(str(exc), is_bad_input=True)
        except Exception as exc:  # a bug in intake fails this request, not the server
            logger.exception("add_request %s failed", req.request_id)
            return RequestFailure(f"add_request failed: {type(exc).__name__}: {exc}",
                                  is_bad_input=False)
        self.request_ids.add(req.request_id)
        return None

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        """Ends the requests and frees their blocks; their final outputs (unknown ids: none)."""
        self.request_ids.difference_update(request_ids)
        return self.engine.abort_request(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> tuple[list[RequestOutput], dict[str, RequestFailure]]:
        """One engine step: its outputs, or, if it raised, a failure for every request held.

        The failed requests are aborted (their blocks freed), so the engine
        serves the next ones.
        """
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug in a step must not kill the server
            logger.exception("engine step failed; failing the requests it held")
            failure = RequestFailure(f"engine step failed: {type(exc).__name__}: {exc}",
                                     is_bad_input=False)
            ids = sorted(self.request_ids)
            self.request_ids.clear()
            try:
                self.engine.abort_request(ids)
            except Exception:
                logger.exception("aborting the failed step's requests failed too")
            return [], {rid: failure for rid in ids}
        for out in outputs:
            if out.finished:
                self.request_ids.discard(out.request_id)
        return outputs, {}

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()
