"""SharedEngine: one LLMEngine driven by blocking calls and by asyncio, never both at once.

LangChain models offer ``invoke``/``stream`` and ``ainvoke``/``astream`` on the
same object. The blocking side steps the ``LLMEngine`` itself (``LLM.generate``,
or ``add_request``/``step`` for a stream); the async side goes through an
``AsyncLLM`` whose loop steps the very same engine from a worker thread. Two
drivers stepping one engine would each swallow the other's outputs, so the
engine has one owner at a time:

    owner lock ── held by ─┬─ one blocking call (generate, or an open stream)
                           └─ one async session: every async request of one event
                              loop in flight together; the first one in takes the
                              lock, the last one out gives it back

An ``AsyncLLM`` keeps its loop task alive between sessions, and that task may
still be between two iterations when a session ends. It therefore sees the
engine through an ``_AsyncEngineView`` that reports "nothing to do" and refuses
to step unless its session owns the engine; the session's end and the view's
step exclude each other, so no step of a finished session overlaps a blocking
call. The model's weights, KV cache and scheduler are shared by both sides.

An ``AsyncLLM`` is bound to the event loop it first ran on (its asyncio lock
and events), so a session on another loop (a second ``asyncio.run``) gets a
fresh ``AsyncLLM`` over the same engine; creating one costs nothing.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Iterator, Optional, cast

from kvflow.engine.async_llm import AsyncLLM
from kvflow.engine.llm_engine import LLMEngine
from kvflow.outputs import RequestOutput

_WAIT_POLL_S = 0.005
"""How often an async caller looks again while a blocking call owns the engine.
Polling keeps the event loop free; a thread blocked on the lock could not be
cancelled and would take the lock for nobody."""


class _AsyncEngineView:
    """The engine as one ``AsyncLLM`` sees it: idle unless its session owns the engine."""

    def __init__(self, shared: "SharedEngine") -> None:
        self._shared = shared
        self._engine = shared.engine

    def has_unfinished_requests(self) -> bool:
        return self._shared._active_view is self and self._engine.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        # Runs in AsyncLLM's worker thread; the session's end waits for it.
        with self._shared._async_step:
            if self._shared._active_view is not self:
                return []
            return self._engine.step()

    def shutdown(self) -> None:
        """The engine outlives any one AsyncLLM; the LangChain object owns it."""

    def __getattr__(self, name: str) -> Any:
        # add_request, abort_request, get_tokenizer, config, ...: only called
        # inside the session (AsyncLLM.generate and its abort on close).
        return getattr(self._engine, name)


class SharedEngine:
    """Hands the engine to one blocking caller or one async session at a time.

    ``sync_use`` and ``async_use`` are the only ways in. A caller that would
    wait for itself (a blocking call on a thread whose event loop holds an
    async session, or an async call while the same thread has a stream open)
    gets a RuntimeError instead of a deadlock.
    """

    _CLIENT_ATTR = "_langchain_shared_engine"

    @classmethod
    def of(cls, client: Any) -> "SharedEngine":
        """The guard of a ``kvflow.LLM``'s engine, made on first use.

        It is kept on the client itself, so every LangChain object built on one
        client (a ``VLLM`` and a ``ChatKVFlow`` sharing a model) shares it too.
        """
        shared = getattr(client, cls._CLIENT_ATTR, None)
        if shared is None:
            shared = cls(client.llm_engine)
            setattr(client, cls._CLIENT_ATTR, shared)
        return shared

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._owner = threading.Lock()
        self._state = threading.Lock()  # guards the fields below; held only briefly
        self._owner_thread: Optional[int] = None
        self._async_llm: Optional[AsyncLLM] = None
        self._async_loop: Optional[asyncio.AbstractEventLoop] = None
        self._num_async_users = 0
        self._active_view: Optional[_AsyncEngineView] = None
        self._async_step = threading.Lock()  # one AsyncLLM step vs. the end of its session

    # ------------------------------------------------------------------ blocking side
    @contextmanager
    def sync_use(self) -> Iterator[LLMEngine]:
        """Owns the engine for the body; waits while another caller owns it.

        On exit the engine must hold none of the body's requests (finished or
        aborted), or the next owner would step them.
        """
        me = threading.get_ident()
        with self._state:
            if self._owner_thread == me:
                raise RuntimeError(
                    "The kvflow engine is already in use on this thread (an unfinished "
                    "stream, or an async call on this thread's event loop); finish or close "
                    "it before the next call, or make the call from another thread.")
        with self._owner:
            with self._state:
                self._owner_thread = me
            try:
                yield self.engine
            finally:
                with self._state:
                    self._owner_thread = None

    # ------------------------------------------------------------------ async side
    @asynccontextmanager
    async def async_use(self) -> AsyncIterator[AsyncLLM]:
        """Joins (or opens) this event loop's session; yields its AsyncLLM.

        Every request made through the yielded AsyncLLM must end (finish, or
        its generator be closed) before the body exits.
        """
        async_llm = await self._enter_async()
        try:
            yield async_llm
        finally:
            self._leave_async()

    async def _enter_async(self) -> AsyncLLM:
        loop = asyncio.get_running_loop()
        me = threading.get_ident()
        while True:
            with self._state:
                if self._num_async_users and self._async_loop is loop:
                    self._num_async_users += 1
                    return cast(AsyncLLM, self._async_llm)
                if self._owner_thread == me:
                    raise RuntimeError(
                        "The kvflow engine is held by an unfinished stream on this thread; "
                        "finish or close it before an async call on the same thread.")
                if self._owner.acquire(blocking=False):
                    self._owner_thread = me
                    if self._async_llm is None or self._async_loop is not loop:
                        view = _AsyncEngineView(self)
                        self._async_llm = AsyncLLM(cast(LLMEngine, view))
                        self._async_loop = loop
                    self._active_view = cast(_AsyncEngineView, self._async_llm.engine)
                    self._num_async_users = 1
                    return self._async_llm
            await asyncio.sleep(_WAIT_POLL_S)

    def _leave_async(self) -> None:
        with self._state:
            self._num_async_users -= 1
            if self._num_async_users:
                return
            with self._async_step:  # lets a step already begun finish first
                self._active_view = None
            self._owner_thread = None
            self._owner.release()
