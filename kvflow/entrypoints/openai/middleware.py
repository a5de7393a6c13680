"""Plain ASGI middlewares: the API-key guard and the request-body size limit.

Both run before FastAPI parses anything, so a request they refuse costs no
parsing, and both answer in the server's JSON error shape.
"""

from __future__ import annotations

import hmac
import json
from typing import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvflow.entrypoints.openai.errors import error_body


async def _send_error(send: Send, status: int, message: str,
                      extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every route but the open ones.

    The header is compared with ``hmac.compare_digest``, whose time does not
    depend on where the first differing byte is, so response times leak
    nothing of the key. CORS preflights (OPTIONS) pass: browsers send them
    without credentials, and the CORS middleware answers them.
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or scope.get("path", "") in self.open_paths):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
                break
        if not hmac.compare_digest(given, self.expected):
            message = ("Missing API key: send 'Authorization: Bearer <key>'." if not given
                       else "Invalid API key.")
            await _send_error(send, 401, message, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with a 413, before the app sees them.

    A declared Content-Length over the limit is refused at once. A chunked body
    is read up to the limit and then replayed to the app, so the app never
    buffers more than ``max_bytes`` of one request.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (f"The request body is {size} bytes, over this server's limit of "
                f"{self.max_bytes} bytes (--max-request-body-bytes).")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "Content-Length is not a number.")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, self._message(str(declared)))
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left before sending its whole body; let the app see that.
                pending: list[Message] = [message]
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, 413, self._message(f"more than {self.max_bytes}"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks),
                            "more_body": False}]
                break

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        await self.app(scope, replay, send)
