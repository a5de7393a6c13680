"""OpenAI-style error responses, and the mapping of every failure to one of them.

Every error the server sends is ``{"error": {"message", "type", "param",
"code"}}`` (vLLM's shape: ``type`` names the error class OpenAI's client
raises, ``code`` repeats the status). A client's mistake is a 4xx whose
message says what to change; only a fault of the server is a 5xx, and its
message never carries a traceback (the log does).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflow.engine.core_client import EngineDeadError

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised by handlers; becomes an error response with this status."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def error_body(status: int, message: str, param: Optional[str] = None) -> dict[str, Any]:
    err_type = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(status: int, message: str, param: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


_PARAM_RE = re.compile(r"^([a-z_][a-z0-9_]*)\s*(?:=|must|is|holds|exceeds|>)")


def from_value_error(exc: ValueError, known_params: Iterable[str]) -> APIError:
    """A 400 for a ValueError of SamplingParams or the engine, naming the field it is about.

    Their messages start with the field name (``top_p must be in (0, 1], got 5``),
    so the param is read from there when it is a field of the request.
    """
    message = str(exc) or type(exc).__name__
    match = _PARAM_RE.match(message)
    param = match.group(1) if match and match.group(1) in set(known_params) else None
    return APIError(message, 400, param)


def stream_error_status(exc: Exception) -> int:
    """The status of an error that ends a stream after its 200 went out (an SSE event)."""
    if isinstance(exc, ValueError):
        return 400
    return 503 if isinstance(exc, EngineDeadError) else 500


# ---------------------------------------------------------------------------- validation
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the tried union member into ``loc``; a person wants the field path only."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in _TYPE_TAGS or part[:1].isupper()


def _loc_to_param(loc: tuple[Any, ...]) -> Optional[str]:
    parts = [p for p in loc if not _is_union_tag(p)]
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(errors: list[dict[str, Any]], content_type: Optional[str]
                       ) -> tuple[str, Optional[str]]:
    """One readable sentence (and the first param) for pydantic's list of errors."""
    for err in errors:
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            pos = loc[1] if len(loc) > 1 else "?"
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            return f"The body is not valid JSON ({detail} at character {pos}).", None
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if loc == ("body",) and err.get("type") in ("missing", "model_attributes_type",
                                                    "dict_type", "model_type"):
            if err.get("type") == "missing":
                return "The request has no body: send a JSON object.", None
            if content_type and "json" not in content_type:
                message = ("The body must be a JSON object sent with Content-Type: "
                           f"application/json, got Content-Type: {content_type}.")
                return message, None
            return f"The body must be a JSON object, got {_short(err.get('input'))}.", None
    groups: dict[Optional[str], list[str]] = {}
    for err in errors:
        param = _loc_to_param(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        if err.get("type") not in ("missing",) and "input" in err:
            msg = f"{msg} (got {_short(err['input'])})"
        bucket = groups.setdefault(param, [])
        if msg not in bucket:
            bucket.append(msg)
    parts = [f"{p or 'body'}: {' or '.join(msgs[:4])}" for p, msgs in list(groups.items())[:5]]
    if len(groups) > 5:
        parts.append(f"and {len(groups) - 5} more fields")
    first = next(iter(groups), None)
    return "Invalid request: " + "; ".join(parts) + ".", first


# ---------------------------------------------------------------------------- handlers
def install_exception_handlers(app: FastAPI) -> None:
    """Routes every failure, expected or not, to the error shape above."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()), request.headers.get("content-type"))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "No such route. See /docs for the routes this server has."
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        # Shutting down, or its process died: either way this server generates no more.
        return error_response(503, str(exc) or "The engine is not running.")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"Internal server error ({type(exc).__name__}); "
                              "the server log has the details.")
