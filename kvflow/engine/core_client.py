"""How ``AsyncLLM`` reaches the engine: in its own process, or in this one.

    AsyncLLM: one asyncio queue per request; generate / abort / shutdown
        │ add_request · abort · shutdown (async)        ▲ OutputSink callbacks,
        ▼                                               │ always on the event loop's thread
    MPCoreClient      the engine core process (mp_client.py, core_proc.py); `kvflow serve`
    InProcCoreClient  the engine stepped in a worker thread of this process; LangChain, tests

Both drive an ``EngineCore``, so a rejected request, a failing step and an
abort look the same to ``AsyncLLM`` either way.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, Optional, Protocol

from kvflow.config import EngineConfig
from kvflow.engine.engine_core import AddRequest, EngineCore, RequestFailure
from kvflow.engine.llm_engine import EngineStats, LLMEngine
from kvflow.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine takes no more requests: it was shut down, or its process died."""


SHUT_DOWN_MESSAGE = "The engine is shutting down; retry on another replica."


class OutputSink(Protocol):
    """Where a client delivers what the engine did; called on the event loop's thread only."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...

    def on_failures(self, failures: dict[str, RequestFailure]) -> None: ...

    def on_dead(self, error: EngineDeadError) -> None:
        """The engine is gone: every request in flight fails with ``error``."""


class BaseCoreClient(ABC):
    """The engine as ``AsyncLLM`` drives it. Coroutines run on the loop ``start`` bound."""

    config: EngineConfig

    @abstractmethod
    def get_tokenizer(self) -> Any: ...

    @abstractmethod
    def get_stats(self) -> EngineStats:
        """Cheap: /metrics calls it on the event loop."""

    @property
    def dead_error(self) -> Optional[EngineDeadError]:
        """Set once the engine can take no request (its process died)."""
        return None

    @abstractmethod
    def start(self, sink: OutputSink) -> None:
        """Binds the client to the running event loop; outputs go to ``sink`` from now on."""

    @abstractmethod
    async def add_request(self, req: AddRequest) -> None:
        """Queues the request. Its rejection comes to ``sink.on_failures``, never raised."""

    @abstractmethod
    async def abort(self, request_ids: list[str]) -> None:
        """Ends the requests and frees their blocks; their final outputs are dropped."""

    @abstractmethod
    async def profile(self, start: bool) -> None:
        """Starts (or stops) the engine's profiler between two steps."""

    @abstractmethod
    async def shutdown(self, request_ids: list[str]) -> None:
        """Aborts ``request_ids`` (their final outputs go to the sink), then stops the engine."""


# ---------------------------------------------------------------------------- in this process
class InProcCoreClient(BaseCoreClient):
    """The engine in this process: one asyncio task runs each step in a worker thread.

    The forward pass releases the GIL, so the event loop keeps serving
    meanwhile. Adds and aborts take the same lock as a step, so the engine is
    only ever touched by one thread at a time.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.core = EngineCore(engine)
        self._sink: Optional[OutputSink] = None
        self._lock: Optional[asyncio.Lock] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._closed = False

    @property
    def config(self) -> EngineConfig:  # type: ignore[override]
        return self.engine.config

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def start(self, sink: OutputSink) -> None:
        self._sink = sink
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def add_request(self, req: AddRequest) -> None:
        assert self._lock is not None and self._wakeup is not None and self._sink is not None
        async with self._lock:
            failure = self.core.add_request(req)
        if failure is not None:
            self._sink.on_failures({req.request_id: failure})
        else:
            self._wakeup.set()

    async def abort(self, request_ids: list[str]) -> None:
        if self._lock is None:
            return
        async with self._lock:
            self.core.abort_requests(request_ids)

    async def _run(self) -> None:
        assert self._lock is not None and self._wakeup is not None and self._sink is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self.core.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            async with self._lock:
                outputs, failures = await loop.run_in_executor(None, self.core.step)
            if failures:
                self._sink.on_failures(failures)
            self._sink.on_outputs(outputs)
            await asyncio.sleep(0)  # let handlers run between steps

    async def profile(self, start: bool) -> None:
        if self._lock is None:  # not started: no step can be running
            self.core.profile(start)
            return
        async with self._lock:  # between steps, as adds and aborts
            self.core.profile(start)

    async def shutdown(self, request_ids: list[str]) -> None:
        self._closed = True
        if self._lock is not None and self._sink is not None:
            async with self._lock:
                self._sink.on_outputs(self.core.abort_requests(request_ids))
        if self._wakeup is not None:
            self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self.engine.shutdown()
