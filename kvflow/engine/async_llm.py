"""AsyncLLM: the engine behind an asyncio API, for the server and async integrations.

Each request gets an asyncio queue; a core client (core_client.py) feeds it
the request's outputs, or the exception that ends it. Where the engine runs
is the client's business:

- ``AsyncLLM.from_engine_args(args)`` starts the engine core process
  (``MPCoreClient``), so the engine's Python never competes with the event
  loop for the GIL. This is what ``kvflow serve`` uses.
- ``AsyncLLM(engine)`` and ``from_engine_args(args, in_process=True)`` step an
  engine of this process in a worker thread (``InProcCoreClient``): the
  LangChain integration shares its ``LLMEngine`` this way.

A caller that stops iterating (client disconnect, cancellation) aborts its
request at once, which frees its KV blocks. A failing step fails the requests
it held, never the engine; a dead engine process fails every request in
flight and every new one with ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncGenerator, Optional

from kvflow.config import EngineArgs, ModelConfig
from kvflow.engine.core_client import (
    SHUT_DOWN_MESSAGE,
    BaseCoreClient,
    EngineDeadError,
    InProcCoreClient,
)
from kvflow.engine.engine_core import AddRequest, RequestFailure
from kvflow.engine.llm_engine import EngineStats, LLMEngine, PromptType
from kvflow.engine.mp_client import MPCoreClient
from kvflow.engine.output_processor import RequestOutputKind
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger("kvflow")

__all__ = ["AsyncLLM", "EngineDeadError"]


class AsyncLLM:
    """``generate`` streams one request's outputs; any number run at once, batched."""

    def __init__(self, engine: Optional[LLMEngine] = None, *,
                 client: Optional[BaseCoreClient] = None) -> None:
        """Serves ``engine`` in this process, or the engine behind ``client`` (one of the two)."""
        if (engine is None) == (client is None):
            raise ValueError("AsyncLLM takes an LLMEngine or a core client, not both or neither.")
        self.engine = engine
        """The in-process engine; None when the engine runs in the engine core process."""
        self.client: BaseCoreClient = client or InProcCoreClient(engine)  # type: ignore[arg-type]
        self._streams: dict[str, asyncio.Queue] = {}
        self._closed = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs, *, in_process: bool = False) -> "AsyncLLM":
        """Builds the engine in the engine core process (default) or in this one.

        The config is read here either way (it also fails bad options before
        any process starts); the core gets it whole rather than reading it again.
        """
        config = args.create_engine_config()
        if in_process:
            return cls(LLMEngine(config))
        return cls(client=MPCoreClient(config))

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self) -> Any:
        return self.client.get_tokenizer()

    def get_tokenizer(self) -> Any:
        return self.client.get_tokenizer()

    @property
    def model_config(self) -> ModelConfig:
        return self.client.config.model_config

    def get_stats(self) -> EngineStats:
        return self.client.get_stats()

    @property
    def dead_error(self) -> Optional[EngineDeadError]:
        """Why no request can run any more (shut down, or the engine process died); else None."""
        if self.client.dead_error is not None:
            return self.client.dead_error
        return EngineDeadError(SHUT_DOWN_MESSAGE) if self._closed else None

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: PromptType, sampling_params: Optional[SamplingParams],
                       request_id: str, *, arrival_time: Optional[float] = None,
                       output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Streams the request's outputs until it finishes.

        Raises ValueError before the first output on bad input, EngineDeadError
        if the engine is gone. Leaving the loop early (break, cancellation, a
        closed connection) aborts the request.
        """
        dead = self.dead_error
        if dead is not None:
            raise EngineDeadError(str(dead))
        self.client.start(self)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            await self.client.add_request(AddRequest(request_id, prompt, sampling_params,
                                                     arrival_time, output_kind))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Ends a request and frees its blocks (no-op if it already ended)."""
        if self._streams.pop(request_id, None) is not None:
            await self.client.abort([request_id])

    async def start_profile(self) -> None:
        """torch.profiler on in the engine's workers (traces to $KVFLOW_TORCH_PROFILER_DIR)."""
        await self.client.profile(True)

    async def stop_profile(self) -> None:
        """Stops it; each worker rank writes its trace."""
        await self.client.profile(False)

    async def shutdown(self) -> None:
        """Aborts what is in flight (streams end with finish_reason "abort"); stops the engine."""
        if self._closed:
            return
        self._closed = True
        await self.client.shutdown(list(self._streams))
        self.on_dead(EngineDeadError(SHUT_DOWN_MESSAGE))

    # ------------------------------------------------------------------ OutputSink
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is None:
                continue
            queue.put_nowait(out)
            if out.finished:
                self._streams.pop(out.request_id, None)

    def on_failures(self, failures: dict[str, RequestFailure]) -> None:
        for request_id, failure in failures.items():
            queue = self._streams.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(failure.to_exception())

    def on_dead(self, error: EngineDeadError) -> None:
        streams, self._streams = self._streams, {}
        for queue in streams.values():
            queue.put_nowait(EngineDeadError(str(error)))
