"""AsyncLLM: the engine behind an asyncio API, for the server and async integrations.

One asyncio task drives the engine: it waits for work, then runs
``LLMEngine.step`` in a worker thread (the forward pass releases the GIL, so
the event loop keeps serving HTTP meanwhile) and routes each RequestOutput to
its request's queue. Adds and aborts take the same lock as a step, so the
engine is only ever touched by one thread at a time.

A caller that stops iterating (client disconnect, cancellation) aborts its
request at once, which frees its KV blocks. A failing step fails the requests
it held, never the loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncGenerator, Optional

from kvflow.config import EngineArgs
from kvflow.engine.llm_engine import LLMEngine, PromptType
from kvflow.engine.output_processor import RequestOutputKind
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger("kvflow")


class EngineDeadError(RuntimeError):
    """The engine loop was shut down; no new request is accepted."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._lock: Optional[asyncio.Lock] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._closed = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(args))

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    @property
    def model_config(self):
        return self.engine.config.model_config

    def get_stats(self):
        return self.engine.get_stats()

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def _ensure_loop(self) -> None:
        if self._closed:
            raise EngineDeadError("The engine has been shut down.")
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: PromptType, sampling_params: Optional[SamplingParams],
                       request_id: str, *, arrival_time: Optional[float] = None,
                       output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Streams the request's outputs until it finishes.

        Raises ValueError before the first output on bad input. Leaving the
        loop early (break, cancellation, a closed connection) aborts the request.
        """
        self._ensure_loop()
        assert self._lock is not None and self._wakeup is not None
        queue: asyncio.Queue = asyncio.Queue()
        async with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use.")
            self.engine.add_request(request_id, prompt, sampling_params,
                                    arrival_time=arrival_time, output_kind=output_kind)
            self._streams[request_id] = queue
        self._wakeup.set()
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
        if self._lock is None:
            return
        async with self._lock:
            self.engine.abort_request(request_id)
            self._streams.pop(request_id, None)

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        assert self._lock is not None and self._wakeup is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            async with self._lock:
                try:
                    outputs = await loop.run_in_executor(None, self.engine.step)
                except Exception as exc:  # a bug in a step must not kill the server
                    logger.exception("engine step failed; failing the requests it held")
                    self._fail_all(exc)
                    continue
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is None:
                    continue
                queue.put_nowait(out)
                if out.finished:
                    self._streams.pop(out.request_id, None)
            await asyncio.sleep(0)  # let handlers run between steps

    def _fail_all(self, exc: Exception) -> None:
        ids = list(self._streams)
        self.engine.abort_request(ids)
        err = RuntimeError(f"engine step failed: {type(exc).__name__}: {exc}")
        for rid in ids:
            self._streams.pop(rid).put_nowait(err)

    async def shutdown(self) -> None:
        """Aborts what is in flight and stops the loop."""
        self._closed = True
        if self._lock is not None:
            async with self._lock:
                ids = list(self._streams)
                for out in self.engine.abort_request(ids):
                    q = self._streams.pop(out.request_id, None)
                    if q is not None:
                        q.put_nowait(out)
        if self._wakeup is not None:
            self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self.engine.shutdown()
