"""What both completion endpoints share: model names, prompt checks, sampling params,
running engine requests, logprob tokens.

The life of a request's engine work, and who ends it:

    handler ─► run_requests() ─► AsyncLLM.generate(...) per prompt
                  │ first __anext__: every prompt admitted (or a ValueError → 400)
                  │ yields (prompt index, RequestOutput) until all finish
                  └ finally (sync): abort what has not finished, log it

``run_requests`` keeps its ``finally`` free of ``await``. Starlette cancels a
stream whose client left with anyio's level cancellation, which re-cancels
every ``await`` in the cancelled task; an ``await abort()`` there could be
cancelled itself and leak the request's KV blocks. So aborts are scheduled as
fresh tasks, which no cancel scope covers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Awaitable, Optional, TypeVar

from fastapi import Request

from kvflow.engine.output_processor import RequestOutputKind
from kvflow.entrypoints.openai.errors import APIError, from_value_error
from kvflow.entrypoints.openai.metrics import ServerMetrics
from kvflow.entrypoints.openai.protocol import (
    PromptLogprob,
    PromptLogprobs,
    SamplingFields,
)
from kvflow.outputs import Logprob, RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger("kvflow.entrypoints.openai")

GUIDED_DECODING_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                          "guided_whitespace_pattern", "structured_outputs")
"""vLLM's extra body fields for constrained output: refused, never silently ignored."""

T = TypeVar("T")

MIN_LOGPROB = -9999.0
"""JSON has no -inf: a token the sampler could never pick reports this (vLLM's convention)."""


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


@dataclass
class EnginePrompt:
    """One prompt of an HTTP request, tokenized and checked, ready for the engine."""

    request_id: str
    token_ids: list[int]
    text: Optional[str]
    params: SamplingParams

    @property
    def engine_input(self) -> dict[str, Any]:
        return {"prompt_token_ids": self.token_ids, "prompt": self.text}


@dataclass
class _Progress:
    """Bookkeeping of one engine request while it streams, for metrics and the log line."""

    num_prompt_tokens: int
    num_output_tokens: int = 0
    finished: bool = False
    failed: bool = False
    """Rejected at admission or failed by the engine: nothing left to abort or to record."""


async def run_until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable`` unless the client disconnects first (then cancels it).

    Starlette does not cancel a handler whose client left; without this, a
    non-streaming request would run to its last token for nobody.
    """
    work = asyncio.ensure_future(awaitable)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watcher.cancel()
        raise
    if work in done:
        watcher.cancel()
        return work.result()
    work.cancel()
    raise ClientDisconnected()


class OpenAIServing:
    """Holds the engine handle and the server options the endpoints need."""

    def __init__(self, async_llm: Any, *, served_model_names: list[str], metrics: ServerMetrics,
                 chat_template: Optional[str] = None,
                 trust_request_chat_template: bool = False, log_requests: bool = True,
                 return_tokens_as_token_ids: bool = False) -> None:
        self.async_llm = async_llm
        self.log_requests = log_requests
        self.return_tokens_as_token_ids = return_tokens_as_token_ids
        """Server default of the request field of that name (--return-tokens-as-token-ids)."""
        self.served_model_names = list(served_model_names)
        self.metrics = metrics
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template
        self.tokenizer = async_llm.get_tokenizer()
        self._background: set[asyncio.Future] = set()
        model_config = async_llm.model_config
        self.sampling_defaults: dict[str, Any] = {
            k: v for k, v in model_config.sampling_defaults.items() if k != "max_tokens"}
        """The model's generation_config.json sampling settings (``--generation-config``),
        used where a request leaves a field unset; max_tokens stays each route's own."""
        self.max_model_len: int = model_config.max_model_len
        self.vocab_size: int = model_config.vocab_size

    # ------------------------------------------------------------------ request checks
    def resolve_model(self, requested: Optional[str]) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(f"The model `{requested}` does not exist. This server serves "
                           f"{self.served_model_names} (see /v1/models).", 404, "model")
        return requested

    @staticmethod
    def log_ignored_fields(request: SamplingFields) -> None:
        extra = request.model_extra or {}
        if extra:
            logger.warning("ignoring unknown request fields: %s", sorted(extra))

    def require_tokenizer(self, param: str = "prompt") -> Any:
        if self.tokenizer is None:
            hint = ("send prompts as token ids" if param == "prompt"
                    else "chat templates need one; use /v1/completions with token ids")
            raise APIError(f"The server runs without a tokenizer (skip_tokenizer_init): {hint}.",
                           400, param)
        return self.tokenizer

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(f"{param} holds token ids {bad[:5]} outside the vocabulary "
                           f"[0, {self.vocab_size}).", 400, param)

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: Optional[int],
                           param: str, max_tokens_param: str = "max_tokens") -> int:
        """Checks the prompt and the requested output against the context; returns max_tokens.

        As in OpenAI's and vLLM's servers, asking for more than fits is an error
        rather than a silent cut, so the client learns the context size.
        """
        room = self.max_model_len - num_prompt_tokens
        if room <= 0:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens, and the "
                f"prompt has {num_prompt_tokens} tokens, leaving no room to generate. Shorten "
                f"the prompt (or use truncate_prompt_tokens).", 400, param)
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in "
                f"the prompt, {max_tokens} for the completion). Reduce the prompt or max_tokens "
                f"to at most {room}.", 400, max_tokens_param)
        return max_tokens

    def check_common(self, request: SamplingFields) -> None:
        """Rejects options kvflow cannot honour, instead of ignoring them."""
        if request.stream_options is not None and not request.stream:
            raise APIError("stream_options is only allowed with stream=true.", 400,
                           "stream_options")
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            raise APIError(f"response_format type {fmt.type!r} (structured output) is not "
                           "supported by kvflow yet; use 'text'.", 400, "response_format")
        extra = request.model_extra or {}
        for name in GUIDED_DECODING_FIELDS:
            if extra.get(name) is not None:
                raise APIError(f"{name} (vLLM's guided decoding) is not supported by kvflow yet: "
                               "the reply would not be constrained. Drop it and check the text "
                               "yourself.", 400, name)
        if request.stop_token_ids:
            self.check_token_ids(request.stop_token_ids, "stop_token_ids")
        if request.prompt_logprobs is not None and request.stream:
            raise APIError("prompt_logprobs is not available with stream=true.", 400,
                           "prompt_logprobs")

    def sampling_params(self, request: SamplingFields, *, max_tokens: int,
                        logprobs: Optional[int], prompt_logprobs: Optional[int],
                        field_names: Any) -> SamplingParams:
        """SamplingParams from the request; its ValueErrors become 400s naming the field."""
        logit_bias: Optional[dict[int, float]] = None
        if request.logit_bias:
            logit_bias = {}
            for key, value in request.logit_bias.items():
                try:
                    token = int(key)
                except ValueError:
                    raise APIError(f"logit_bias keys must be token ids, got {key!r}.", 400,
                                   "logit_bias") from None
                if not -100.0 <= value <= 100.0:
                    raise APIError(f"logit_bias values must be in [-100, 100], got {value} for "
                                   f"token {key}.", 400, "logit_bias")
                logit_bias[token] = value
            self.check_token_ids(list(logit_bias), "logit_bias")
        d = self._default
        try:
            return SamplingParams(
                n=request.n,
                best_of=request.best_of,
                presence_penalty=_or(request.presence_penalty, 0.0),
                frequency_penalty=_or(request.frequency_penalty, 0.0),
                repetition_penalty=_or(request.repetition_penalty, d("repetition_penalty", 1.0)),
                temperature=_or(request.temperature, d("temperature", 1.0)),
                top_p=_or(request.top_p, d("top_p", 1.0)),
                top_k=_or(request.top_k, d("top_k", 0)),
                min_p=_or(request.min_p, d("min_p", 0.0)),
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=request.skip_special_tokens,
                spaces_between_special_tokens=request.spaces_between_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                logit_bias=logit_bias,
                allowed_token_ids=request.allowed_token_ids,
            )
        except ValueError as exc:
            raise from_value_error(exc, field_names) from None

    def _default(self, name: str, fallback: Any) -> Any:
        """The model's default for a sampling field, else vLLM's."""
        return self.sampling_defaults.get(name, fallback)

    @staticmethod
    def new_request_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ running
    async def run_requests(self, prompts: list[EnginePrompt], kind: RequestOutputKind,
                           arrival_time: float
                           ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Runs the prompts as engine requests; yields (prompt index, output) as they come.

        The first ``__anext__`` returns only once every prompt produced an output
        or failed, so a handler learns of bad input before it commits to a status
        code; the first failure is raised there (``ValueError`` for bad input).
        Closing the generator at any point aborts whatever has not finished.
        """
        progress = [_Progress(len(p.token_ids)) for p in prompts]
        gens = [self.async_llm.generate(p.engine_input, p.params, p.request_id,
                                        arrival_time=arrival_time, output_kind=kind)
                for p in prompts]
        queue: asyncio.Queue = asyncio.Queue()
        tasks: list[asyncio.Task] = []

        async def pump(index: int) -> None:
            try:
                async for out in gens[index]:
                    queue.put_nowait((index, out, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # delivered to the reader, which decides the status
                queue.put_nowait((index, None, exc))

        def account(index: int, out: RequestOutput) -> None:
            state = progress[index]
            state.num_output_tokens += sum(len(c.token_ids) for c in out.outputs)
            if out.finished and not state.finished:
                state.finished = True
                self._record_finished(prompts[index].request_id, state, out)

        try:
            if len(prompts) == 1:
                # The common case needs no merging: read the engine stream directly.
                try:
                    async for out in gens[0]:
                        account(0, out)
                        yield 0, out
                except Exception:
                    progress[0].failed = True
                    raise
                return
            tasks = [asyncio.ensure_future(pump(i)) for i in range(len(prompts))]
            # Admission: hold outputs back until every prompt has answered once.
            held: list[tuple[int, RequestOutput]] = []
            answered: set[int] = set()
            while len(answered) < len(prompts):
                index, out, exc = await queue.get()
                if exc is not None:
                    progress[index].failed = True
                    raise exc
                answered.add(index)
                held.append((index, out))
            for index, out in held:
                account(index, out)
                yield index, out
            while not all(p.finished for p in progress):
                index, out, exc = await queue.get()
                if exc is not None:
                    progress[index].failed = True
                    raise exc
                account(index, out)
                yield index, out
        finally:
            for task in tasks:
                task.cancel()
            for prompt, state in zip(prompts, progress):
                if not state.finished and not state.failed:
                    state.finished = True
                    self._spawn(self.async_llm.abort(prompt.request_id))
                    self._record_finished(prompt.request_id, state, None, arrival_time)

    def tokens_as_ids(self, request: Any) -> bool:
        """Whether logprob tokens are written "token_id:N": the request's choice, else the
        server's default."""
        value = request.return_tokens_as_token_ids
        return self.return_tokens_as_token_ids if value is None else bool(value)

    def _spawn(self, coro: Any) -> None:
        """Runs ``coro`` as a task the event loop keeps a reference to until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record_finished(self, request_id: str, state: _Progress,
                         out: Optional[RequestOutput], arrival_time: float = 0.0) -> None:
        """One log line and the latency metrics of an engine request that ended.

        ``out`` is its final output, or None when the server gave up on it (the
        client left): then it counts as aborted, timed from ``arrival_time``.
        """
        now = time.monotonic()
        metrics = out.metrics if out is not None else None
        if out is not None:
            reason = ",".join(sorted({c.finish_reason or "abort" for c in out.outputs}))
            outcome = f"finished ({reason or 'abort'})"
        else:
            reason, outcome = "abort", "aborted (client gone)"
        self.metrics.observe_finished(metrics, state.num_prompt_tokens, state.num_output_tokens,
                                      reason or "abort")
        start = metrics.arrival_time if metrics is not None else arrival_time
        end = metrics.finished_time if metrics is not None and metrics.finished_time else now
        ttft = "-"
        if metrics is not None and metrics.first_token_time is not None:
            ttft = f"{metrics.first_token_time - metrics.arrival_time:.3f}s"
        if self.log_requests:
            logger.info("request %s %s: prompt_tokens=%d output_tokens=%d latency=%.3fs ttft=%s",
                        request_id, outcome, state.num_prompt_tokens, state.num_output_tokens,
                        end - start, ttft)

    # ------------------------------------------------------------------ logprobs
    @staticmethod
    def prompt_logprobs(entries: Optional[list[Optional[dict[int, Logprob]]]],
                        num_prompt_tokens: int) -> PromptLogprobs:
        """vLLM's ``prompt_logprobs`` field: one entry per prompt token, None for the first."""
        out: PromptLogprobs = []
        for entry in list(entries or [])[:num_prompt_tokens]:
            out.append(None if entry is None else {
                tid: PromptLogprob(logprob=clamp_logprob(lp.logprob), rank=lp.rank,
                                   decoded_token=lp.decoded_token)
                for tid, lp in entry.items()})
        return out

    def token_text(self, token_id: int, logprob: Optional[Logprob], as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])


def clamp_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) else max(value, MIN_LOGPROB)


def _or(value: Optional[T], default: T) -> T:
    return default if value is None else value
