"""Server-sent events in OpenAI's framing: ``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


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
