"""The OpenAI-compatible HTTP server: ``build_app`` (FastAPI routes) and ``run_server`` (uvicorn).

Layers of one request, outside in:

    uvicorn ─► CORS ─► API key (401) ─► body size (413) ─► FastAPI: parse + validate (400)
            ─► handler: model (404), prompt/params checks (400) ─► AsyncLLM ─► JSON or SSE
                                                                      │ pipes
                                                  the engine core process (engine/core_proc.py)

``ServerArgs`` holds the options of this layer; ``kvflow serve`` generates its
flags from these fields as it does the engine's from ``EngineArgs``.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting; at the same moment the
engine aborts what is in flight, so open streams end with finish_reason
"abort" and ``[DONE]`` instead of holding the process; then the engine core
process exits, and the server exits 0. If the engine core process dies, the
requests in flight fail and every later one, /health included, gets a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from kvflow import __version__, envs
from kvflow.entrypoints.openai.errors import APIError, install_exception_handlers
from kvflow.entrypoints.openai.metrics import ServerMetrics
from kvflow.entrypoints.openai.middleware import (
    APIKeyMiddleware,
    BodySizeLimitMiddleware,
)
from kvflow.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from kvflow.entrypoints.openai.serving_base import OpenAIServing
from kvflow.entrypoints.openai.serving_chat import OpenAIServingChat
from kvflow.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvflow.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from kvflow.entrypoints.openai.reasoning import PARSERS
from kvflow.entrypoints.openai.stats_logger import StatsLogger
from kvflow.entrypoints.openai.tool_calls import PARSERS as TOOL_PARSERS
from kvflow.gc_freeze import freeze_startup_heap

logger = logging.getLogger("kvflow.entrypoints.openai")

T = TypeVar("T", bound=OpenAIServing)

OPEN_PATHS = ("/health", "/ping", "/version", "/metrics")
"""Routes the API key does not guard: probes and scrapers carry no credentials."""


@dataclass
class ServerArgs:
    """Options of the HTTP layer (vLLM's flag names); the engine's are in ``EngineArgs``."""

    host: Optional[str] = None
    """Address to bind; None binds every interface, as vLLM does."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: Optional[str] = None
    """Require ``Authorization: Bearer <key>``; $KVFLOW_API_KEY is read when unset."""
    chat_template: Optional[str] = None
    """A Jinja chat template, or the path of a file holding one; overrides the tokenizer's."""
    trust_request_chat_template: bool = False
    """Let requests send their own ``chat_template`` (a template is code: off by default)."""
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    """CORS origins allowed to call the API."""
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    """CORS methods allowed."""
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    """CORS request headers allowed."""
    allow_credentials: bool = False
    """Whether CORS requests may carry cookies and auth headers."""
    uvicorn_log_level: str = field(default="info", metadata={
        "choices": ["critical", "error", "warning", "info", "debug", "trace"]})
    """Log level of uvicorn's own loggers."""
    disable_uvicorn_access_log: bool = False
    """Drop uvicorn's line per HTTP request (kvflow still logs each finished request)."""
    max_request_body_bytes: int = 32 * 1024 * 1024
    """Bodies over this many bytes get a 413 before they are parsed."""
    timeout_keep_alive: int = 5
    """Seconds an idle keep-alive connection stays open."""
    root_path: Optional[str] = None
    """Path prefix the app is served under behind a proxy (uvicorn's ``root_path``)."""
    ssl_keyfile: Optional[str] = None
    """Serve HTTPS with this private key (with ``--ssl-certfile``)."""
    ssl_certfile: Optional[str] = None
    """Serve HTTPS with this certificate chain (with ``--ssl-keyfile``)."""
    ssl_ca_certs: Optional[str] = None
    """CA certificates to verify clients' certificates against."""
    reasoning_parser: Optional[str] = field(default=None, metadata={"choices": list(PARSERS)})
    """Move a thinking model's <think>...</think> text to ``reasoning_content`` (qwen3,
    deepseek_r1), in whole and streamed chat replies."""
    enable_reasoning: bool = False
    """Older vLLM's switch for the parser; accepted (``--reasoning-parser`` alone is enough)."""
    enable_auto_tool_choice: bool = False
    """Parse the tool calls a model writes into the reply's ``tool_calls`` (tool_choice
    'auto'); needs ``--tool-call-parser``."""
    tool_call_parser: Optional[str] = field(default=None,
                                            metadata={"choices": list(TOOL_PARSERS)})
    """The format the model writes calls in: hermes (Qwen2.5/Qwen3, Hermes)."""
    response_role: str = "assistant"
    """Role of the chat reply when the request asks for a generation prompt."""
    chat_template_content_format: str = field(default="auto",
                                              metadata={"choices": ["auto", "string", "openai"]})
    """How a message's list of content parts reaches the template: joined into a string,
    or kept as text parts; auto keeps them for templates that loop over a message's content."""
    return_tokens_as_token_ids: bool = False
    """Default of the request field: logprob tokens as "token_id:N" instead of text."""
    disable_log_requests: bool = False
    """No log line per finished request (the metrics still count it)."""
    max_log_len: Optional[int] = None
    """Accepted for vLLM scripts: kvflow's request lines carry no prompt text to cut."""
    disable_frontend_multiprocessing: bool = False
    """Run the engine in the server's own process (a worker thread) instead of the engine
    core process; the event loop and the engine then share one GIL."""
    log_stats: bool = field(default=True, metadata={"cli": False})
    """Log the load line every KVFLOW_LOG_STATS_INTERVAL s while busy (stats_logger.py);
    ``kvflow serve`` sets it from the engine flag ``--disable-log-stats``."""
    served_model_names: list[str] = field(default_factory=list, metadata={"cli": False})
    """Names clients may use for the model; the first is the one responses carry.
    Set by ``kvflow serve`` from ``--served-model-name`` (default: the model argument)."""


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template`` as text: a file's content, or the value itself if it is Jinja."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template "
                     "(no '{' in it). Pass a path to a .jinja file or the template text.")


def build_app(async_llm: Any, args: ServerArgs) -> FastAPI:
    """The FastAPI app serving ``async_llm``; starts nothing (uvicorn or a test client runs it)."""
    model_config = async_llm.model_config
    names = list(args.served_model_names) or [
        model_config.served_model_name or model_config.model]
    metrics = ServerMetrics(async_llm, names[0])
    chat_template = load_chat_template(args.chat_template)

    def serving(cls: type[T], **extra: Any) -> T:
        return cls(async_llm, served_model_names=names, metrics=metrics,
                   chat_template=chat_template,
                   trust_request_chat_template=args.trust_request_chat_template,
                   log_requests=not args.disable_log_requests,
                   return_tokens_as_token_ids=args.return_tokens_as_token_ids, **extra)

    defaults = model_config.sampling_defaults
    if defaults:
        logger.info("sampling defaults from the model's generation_config.json: %s (a request "
                    "field overrides its default; --generation-config vllm ignores them)",
                    defaults)
    completions = serving(OpenAIServingCompletion)
    chats = serving(OpenAIServingChat, response_role=args.response_role,
                    content_format=args.chat_template_content_format,
                    reasoning_parser=args.reasoning_parser,
                    tool_parser=args.tool_call_parser if args.enable_auto_tool_choice else None)
    tokenization = serving(OpenAIServingTokenization,
                           content_format=args.chat_template_content_format)
    state = _EngineState(async_llm)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        freeze_startup_heap("API server")  # see kvflow/gc_freeze.py
        stats_task = (asyncio.ensure_future(StatsLogger(async_llm.get_stats).run(
            envs.log_stats_interval())) if args.log_stats else None)
        yield
        if stats_task is not None:
            stats_task.cancel()
        await state.shutdown()

    app = FastAPI(title="kvflow", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of the kvflow inference engine.",
                  strict_content_type=False)
    app.state.engine_state = state
    app.state.metrics = metrics
    install_exception_handlers(app)

    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    @app.get("/ping", responses={503: {"model": ErrorResponse}})  # vLLM's, for SageMaker
    @app.post("/ping", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        """200 while the engine serves; 503 once it is shutting down or its process died."""
        if state.closing:
            raise APIError("The engine is shutting down.", 503)
        dead = async_llm.dead_error
        if dead is not None:
            raise APIError(str(dead), 503)
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/metrics", response_class=Response)
    async def metrics_page() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, root=model_config.model,
                         parent=None if name == names[0] else names[0],
                         max_model_len=model_config.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=errors)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(name) for name in names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors)
    async def retrieve_model(model_id: str) -> ModelCard:
        return model_card(completions.resolve_model(model_id))

    @app.post("/v1/completions", responses={**errors, 200: {
        "model": CompletionResponse,
        "content": {"text/event-stream": {}}}}, response_model=None)
    async def create_completion(request: CompletionRequest, raw: Request) -> Response:
        return await completions.create_completion(request, raw)

    @app.post("/v1/chat/completions", responses={**errors, 200: {
        "model": ChatCompletionResponse,
        "content": {"text/event-stream": {}}}}, response_model=None)
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
        return await chats.create_chat_completion(request, raw)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        return JSONResponse(tokenization.tokenize(request).model_dump(exclude_none=True))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        return tokenization.detokenize(request)

    if envs.torch_profiler_dir():  # as vLLM: the routes exist only with a trace folder
        async def profile(start: bool) -> Response:
            try:
                await (async_llm.start_profile() if start else async_llm.stop_profile())
            except RuntimeError as exc:  # already in that state (engine in this process)
                raise APIError(str(exc), 400) from None
            return Response(status_code=200)

        @app.post("/start_profile", responses=errors)
        async def start_profile() -> Response:
            """torch.profiler on in the engine's workers, until /stop_profile."""
            return await profile(True)

        @app.post("/stop_profile", responses=errors)
        async def stop_profile() -> Response:
            """Each worker rank writes its trace to $KVFLOW_TORCH_PROFILER_DIR."""
            return await profile(False)

    # Added innermost first: CORS answers preflights, then the key, then the size limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=args.max_request_body_bytes)
    api_key = args.api_key or envs.api_key()
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=OPEN_PATHS)
    app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins,
                       allow_credentials=args.allow_credentials,
                       allow_methods=args.allowed_methods, allow_headers=args.allowed_headers)
    return app


class _EngineState:
    """Shuts the engine down once, from a signal or from the app's lifespan, whichever is first."""

    def __init__(self, async_llm: Any) -> None:
        self.async_llm = async_llm
        self.closing = False
        self._done: Optional[asyncio.Future] = None

    async def shutdown(self) -> None:
        if self._done is None:
            self.closing = True
            self._done = asyncio.ensure_future(self.async_llm.shutdown())
        await asyncio.shield(self._done)


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, plus: abort in-flight requests the moment an exit signal comes.

    uvicorn alone would wait for every open stream to end before its lifespan
    shutdown; a long generation would hold the process for minutes.
    """

    def __init__(self, config: uvicorn.Config, engine_state: _EngineState) -> None:
        super().__init__(config)
        self.engine_state = engine_state
        self._tasks: set[asyncio.Task] = set()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        logger.info("signal %d: aborting in-flight requests and shutting down", sig)
        loop = asyncio.get_event_loop()

        def start() -> None:
            task = loop.create_task(self.engine_state.shutdown())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        # Signal handlers run between bytecodes; only the thread-safe call may touch the loop.
        loop.call_soon_threadsafe(start)


def check_server_args(args: ServerArgs) -> None:
    """A ValueError naming the flag for settings that cannot work together: checked by
    ``kvflow serve`` before the model loads, not at the socket or the first request."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{list(TOOL_PARSERS)}).")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together: give both for HTTPS.")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile),
                       ("--ssl-ca-certs", args.ssl_ca_certs)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path!r} is not a file.")


def uvicorn_config(app: FastAPI, args: ServerArgs) -> uvicorn.Config:
    """uvicorn's settings from the server flags (address, logs, keep-alive, proxy path, TLS)."""
    return uvicorn.Config(app, host=args.host or "", port=args.port,
                          log_level=args.uvicorn_log_level,
                          access_log=not args.disable_uvicorn_access_log,
                          timeout_keep_alive=args.timeout_keep_alive,
                          root_path=args.root_path or "", ssl_keyfile=args.ssl_keyfile,
                          ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs)


def run_server(async_llm: Any, args: ServerArgs) -> None:
    """Serves until SIGTERM/SIGINT; returns normally (exit status 0) after a clean shutdown."""
    app = build_app(async_llm, args)
    server = _UvicornServer(uvicorn_config(app, args), app.state.engine_state)
    # uvicorn re-raises the exit signal after its shutdown so the default action
    # (death by signal, status 143) follows; a no-op handler makes the shutdown
    # it just did the end of the process instead, with status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(server.serve())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
