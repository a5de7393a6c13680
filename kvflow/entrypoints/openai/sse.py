"""Server-sent events in OpenAI's framing: ``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Iterable, Optional

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kvflow.entrypoints.openai.errors import error_body, stream_error_status


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


async def stream_events(opening: Iterable[str], first: tuple[int, Any],
                        outputs: AsyncGenerator[tuple[int, Any], None],
                        chunks: Callable[[int, Any], list[str]],
                        closing: Callable[[], Optional[str]]) -> AsyncIterator[str]:
    """The body of a streamed completion or chat response, around its chunk builder.

    ``opening`` events (chat's role/echo chunks), then ``chunks(index, output)`` of the
    first output and of each later one, then ``closing()`` (the usage chunk, or None),
    then ``[DONE]``. After the 200 went out an error can only be an event, so a failure
    becomes an OpenAI error event before ``[DONE]``; the outputs generator is closed
    however the stream ends, which aborts engine requests still running.
    """
    try:
        for event in opening:
            yield event
        for event in chunks(*first):
            yield event
        async for index, out in outputs:
            for event in chunks(index, out):
                yield event
        last = closing()
        if last is not None:
            yield last
    except Exception as exc:
        status = stream_error_status(exc)
        yield sse_event(json.dumps(error_body(status, str(exc) or type(exc).__name__)))
    finally:
        await outputs.aclose()
    yield sse_done()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its body generator.

    Starlette leaves the generator suspended when the client goes away between
    two chunks; closing it here runs its ``finally`` at once, which aborts the
    engine requests behind it instead of waiting for garbage collection.
    """

    media_type = "text/event-stream"

    def __init__(self, content: Any) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
