"""POST /v1/chat/completions: messages rendered by the chat template, reply in OpenAI's format.

The template is the request's ``chat_template`` (only with
``--trust-request-chat-template``: a template is code, and a loop in one can
hold the event loop), else ``--chat-template``, else the tokenizer's own.
Streaming sends, per choice, a first chunk with the role, then content deltas,
with ``finish_reason`` on the chunk that ends the choice.
"""

from __future__ import annotations

import time
from typing import Any, AsyncGenerator, AsyncIterator, Iterator, Optional

from fastapi import Request
from fastapi.responses import Response

from kvflow.engine.output_processor import RequestOutputKind
from kvflow.entrypoints.llm import apply_chat_template
from kvflow.entrypoints.chat_content import resolve_format, template_content
from kvflow.entrypoints.openai.errors import APIError, from_value_error
from kvflow.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatMessage,
    ChatResponseMessage,
    UsageInfo,
)
from kvflow.entrypoints.openai.reasoning import ReasoningSplitter, split_reasoning
from kvflow.entrypoints.openai.serving_base import (
    ClientDisconnected,
    EnginePrompt,
    OpenAIServing,
    clamp_logprob,
    run_until_disconnect,
)
from kvflow.entrypoints.openai.sse import SSEResponse, stream_events
from kvflow.entrypoints.openai.stream_chunks import (
    ChunkWriter,
    chat_choice,
    chat_opening_choice,
    usage_dict,
)
from kvflow.entrypoints.openai.tool_calls import ToolCall, ToolCallStream, parse_tool_calls
from kvflow.outputs import Logprob, RequestOutput

_FIELDS = frozenset(ChatCompletionRequest.model_fields)
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "chat_template", "tokenize",
                                       "add_generation_prompt", "continue_final_message",
                                       "return_dict", "return_tensors", "tokenizer_kwargs"})


def message_to_dict(message: ChatMessage, index: int,
                    content_format: str = "string") -> dict[str, Any]:
    """The message as the template sees it: text parts joined (or kept, ``openai``), other
    parts refused (``kvflow.entrypoints.chat_content``)."""
    data: dict[str, Any] = {"role": message.role}
    where = f"messages[{index}].content"
    try:
        data["content"] = template_content(message.content, content_format, where)
    except ValueError as exc:
        raise APIError(str(exc), 400, where) from None
    for key in ("name", "tool_calls", "tool_call_id"):
        value = getattr(message, key)
        if value is not None:
            data[key] = value
    for key, value in (message.model_extra or {}).items():
        data.setdefault(key, value)
    return data


class OpenAIServingChat(OpenAIServing):
    """/v1/chat/completions: messages through the chat template, then as completions."""

    def __init__(self, *args: Any, response_role: str = "assistant",
                 reasoning_parser: Optional[str] = None, tool_parser: Optional[str] = None,
                 content_format: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.content_format = content_format
        """``--chat-template-content-format`` (resolved per template, chat_content.py)."""
        self.tool_parser = tool_parser
        """``--enable-auto-tool-choice --tool-call-parser``: replies' calls become
        ``tool_calls`` (tool_calls.py); None: tools only reach the template."""
        self.response_role = response_role
        """Role of the reply to a request that asks for a generation prompt (--response-role)."""
        self.reasoning_parser = reasoning_parser
        """``--reasoning-parser``: thinking goes to ``reasoning_content`` (reasoning.py)."""

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool,
               continue_final_message: bool, chat_template: Optional[str],
               template_kwargs: Optional[dict[str, Any]],
               tools: Optional[list[dict[str, Any]]] = None) -> list[int]:
        """Token ids of the conversation; template failures are the client's 400."""
        tokenizer = self.require_tokenizer("messages")
        if chat_template is not None and not self.trust_request_chat_template:
            raise APIError("chat_template in the request is refused: start the server with "
                           "--trust-request-chat-template to allow it, or use --chat-template.",
                           400, "chat_template")
        if continue_final_message and add_generation_prompt:
            raise APIError("continue_final_message and add_generation_prompt are exclusive: "
                           "set add_generation_prompt=false to continue the last message.", 400,
                           "continue_final_message")
        kwargs = dict(template_kwargs or {})
        clash = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if clash:
            raise APIError(f"chat_template_kwargs may not set {clash}.", 400,
                           "chat_template_kwargs")
        if tools is not None:
            kwargs["tools"] = tools
        template = chat_template or self.chat_template
        content_format = resolve_format(
            self.content_format, template or getattr(tokenizer, "chat_template", None))
        conversation = [message_to_dict(m, i, content_format) for i, m in enumerate(messages)]
        try:
            return apply_chat_template(
                tokenizer, conversation, chat_template=template, content_format=content_format,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **kwargs)
        except APIError:
            raise
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, bad kwargs
            raise APIError(f"The chat template could not render these messages: "
                           f"{type(exc).__name__}: {exc}", 400, "messages") from None

    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     raw: Request) -> Response:
        arrival = time.monotonic()
        model = self.resolve_model(request.model)
        self.log_ignored_fields(request)
        self.check_common(request)
        if (request.model_extra or {}).get("use_beam_search"):
            raise APIError("use_beam_search is supported on /v1/completions (and offline by "
                           "LLM.beam_search), not on chat yet: the reply would be sampled.",
                           400, "use_beam_search")
        tools = request.tools
        if tools and request.tool_choice not in ("none", "auto", None):
            raise APIError(f"tool_choice={request.tool_choice!r} forces a call, which needs "
                           "guided decoding; kvflow has none. Use 'auto' (the model decides) "
                           "or 'none'.", 400, "tool_choice")
        if tools and request.tool_choice != "none" and self.tool_parser is None:
            raise APIError("Automatic tool choice needs the server started with "
                           "--enable-auto-tool-choice --tool-call-parser hermes; or send "
                           "tool_choice='none' to only show the tools to the template.", 400,
                           "tool_choice")
        if request.top_logprobs and not request.logprobs:
            raise APIError("top_logprobs needs logprobs=true.", 400, "top_logprobs")
        ids = self.render(request.messages, add_generation_prompt=request.add_generation_prompt,
                          continue_final_message=request.continue_final_message,
                          chat_template=request.chat_template,
                          template_kwargs=request.chat_template_kwargs, tools=tools)
        if request.truncate_prompt_tokens is not None:
            ids = ids[-request.truncate_prompt_tokens:]
        if not ids:
            raise APIError("The rendered conversation is empty.", 400, "messages")
        use_new = request.max_completion_tokens is not None
        requested = request.max_completion_tokens if use_new else request.max_tokens
        max_tokens = self.resolve_max_tokens(
            len(ids), requested, "messages",
            "max_completion_tokens" if use_new else "max_tokens")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, max_tokens=max_tokens, logprobs=logprobs,
                                      prompt_logprobs=request.prompt_logprobs,
                                      field_names=_FIELDS)
        request_id = self.new_request_id("chatcmpl")
        prompt = EnginePrompt(request_id, ids, None, params)
        echo = self._echo_text(request)
        if request.stream:
            return await self._stream(request, raw, prompt, model, request_id, arrival, echo)
        try:
            return await run_until_disconnect(
                raw, self._full(request, prompt, model, request_id, arrival, echo))
        except ClientDisconnected:
            return Response(status_code=499)

    def _parses_tools(self, request: ChatCompletionRequest) -> bool:
        """Whether this reply's tool calls are parsed out of its text."""
        return bool(self.tool_parser and request.tools and request.tool_choice != "none")

    def _reply_role(self, request: ChatCompletionRequest) -> str:
        """The reply's role: ``--response-role`` after a generation prompt, else the last
        message's (the reply continues it)."""
        return self.response_role if request.add_generation_prompt else request.messages[-1].role

    def _echo_text(self, request: ChatCompletionRequest) -> str:
        """With echo, the reply starts with the last message if it has the reply's role."""
        if not request.echo:
            return ""
        last = request.messages[-1]
        if last.role != self._reply_role(request):
            return ""
        return str(message_to_dict(last, len(request.messages) - 1)["content"])

    # ------------------------------------------------------------------ logprobs
    def chat_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]],
                      num_top: int, as_ids: bool) -> dict[str, Any]:
        """``ChatCompletionLogProbs`` as a dict (the stream writes it without pydantic)."""
        content = []
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id)
            token = self.token_text(token_id, chosen, as_ids)
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:num_top]
            top = []
            for tid, lp in ranked:
                text = self.token_text(tid, lp, as_ids)
                top.append({"token": text, "logprob": clamp_logprob(lp.logprob),
                            "bytes": list(text.encode("utf-8"))})
            content.append({
                "token": token,
                "logprob": clamp_logprob(chosen.logprob if chosen else float("nan")),
                "bytes": list(token.encode("utf-8")), "top_logprobs": top})
        return {"content": content}

    # ------------------------------------------------------------------ whole response
    async def _full(self, request: ChatCompletionRequest, prompt: EnginePrompt, model: str,
                    request_id: str, arrival: float, echo: str) -> Response:
        final: Optional[RequestOutput] = None
        try:
            async for _, out in self.run_requests([prompt], RequestOutputKind.FINAL_ONLY,
                                                  arrival):
                final = out
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS) from None
        assert final is not None and final.finished
        choices = []
        num_generated = 0
        as_ids = self.tokens_as_ids(request)
        for comp in sorted(final.outputs, key=lambda c: c.index):
            num_generated += len(comp.token_ids)
            logprobs = None
            if request.logprobs:
                logprobs = self.chat_logprobs(comp.token_ids, list(comp.logprobs or []),
                                              request.top_logprobs or 0, as_ids)
            reasoning, text = None, comp.text
            if self.reasoning_parser is not None:
                reasoning, text = split_reasoning(self.reasoning_parser, comp.text)
            content: Optional[str] = echo + text
            calls: list[ToolCall] = []
            finish_reason = comp.finish_reason
            if self._parses_tools(request):
                parsed, calls = parse_tool_calls(text)
                if calls:
                    content = (echo + parsed) if (echo or parsed) else None
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            choices.append(ChatCompletionResponseChoice(
                index=comp.index,
                message=ChatResponseMessage(role=self._reply_role(request), content=content,
                                            reasoning_content=reasoning,
                                            tool_calls=[c.to_dict() for c in calls]),
                logprobs=logprobs, finish_reason=finish_reason,
                stop_reason=comp.stop_reason,
                token_ids=list(comp.token_ids) if request.return_token_ids else None))
        num_prompt = len(prompt.token_ids)
        response = ChatCompletionResponse(
            id=request_id, model=model, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                            total_tokens=num_prompt + num_generated),
            prompt_token_ids=prompt.token_ids if request.return_token_ids else None)
        if request.prompt_logprobs is not None:
            response.prompt_logprobs = self.prompt_logprobs(final.prompt_logprobs, num_prompt)
        return Response(response.model_dump_json(), media_type="application/json")

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request: ChatCompletionRequest, raw: Request, prompt: EnginePrompt,
                      model: str, request_id: str, arrival: float, echo: str) -> Response:
        outputs = self.run_requests([prompt], RequestOutputKind.DELTA, arrival)
        try:
            first = await run_until_disconnect(raw, outputs.__anext__())
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS) from None
        except ClientDisconnected:
            await outputs.aclose()
            return Response(status_code=499)
        return SSEResponse(self._stream_body(request, prompt, model, request_id, first[1],
                                             outputs, echo))

    async def _stream_body(self, request: ChatCompletionRequest, prompt: EnginePrompt,
                           model: str, request_id: str, first: RequestOutput,
                           outputs: AsyncGenerator[tuple[int, RequestOutput], None],
                           echo: str) -> AsyncIterator[str]:
        created = int(time.time())
        opts = request.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(include_usage and opts and opts.continuous_usage_stats)
        num_prompt = len(prompt.token_ids)
        num_generated = 0
        as_ids = self.tokens_as_ids(request)
        writer = ChunkWriter(request_id, "chat.completion.chunk", created, model)

        def event(choice: dict[str, Any]) -> str:
            return writer.event(choice,
                                usage_dict(num_prompt, num_generated) if continuous else None)

        ended: set[int] = set()
        splitters = ({i: ReasoningSplitter(self.reasoning_parser) for i in range(request.n)}
                     if self.reasoning_parser is not None else None)
        tool_streams = ({i: ToolCallStream() for i in range(request.n)}
                        if self._parses_tools(request) else None)

        def delta_of(comp: Any) -> tuple[dict[str, Any], Optional[str]]:
            """The choice's delta ({"content": text}, or split by the parsers: reasoning,
            content, tool calls at the end) and its finish reason."""
            final = comp.finish_reason is not None
            reasoning, content = "", comp.text
            if splitters is not None:
                reasoning, content = splitters[comp.index].feed(comp.text, final=final)
            calls: list[ToolCall] = []
            if tool_streams is not None:
                content = tool_streams[comp.index].feed(content)
                if final:
                    rest, calls = tool_streams[comp.index].finish()
                    content += rest
            delta: dict[str, Any] = {"reasoning_content": reasoning} if reasoning else {}
            if content or not reasoning:
                delta["content"] = content
            finish_reason = comp.finish_reason
            if calls:
                delta["tool_calls"] = [c.to_dict(i) for i, c in enumerate(calls)]
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            return delta, finish_reason

        def chunks(_: int, out: RequestOutput) -> list[str]:
            nonlocal num_generated
            events = []
            for comp in out.outputs:
                # The request's last output repeats samples that ended earlier (empty deltas).
                if comp.index in ended:
                    continue
                if comp.finish_reason is not None:
                    ended.add(comp.index)
                num_generated += len(comp.token_ids)
                # Held-back text makes no chunk unless token ids or logprobs were asked for.
                wants_tokens = request.logprobs or request.return_token_ids
                delta, finish_reason = delta_of(comp)
                if delta == {"content": ""} and comp.finish_reason is None and not (
                        wants_tokens and comp.token_ids):
                    continue  # nothing to show yet (a stop string, think tag or call forming)
                logprobs = None
                if request.logprobs:
                    logprobs = self.chat_logprobs(comp.token_ids, list(comp.logprobs or []),
                                                  request.top_logprobs or 0, as_ids)
                events.append(event(chat_choice(
                    comp.index, delta, logprobs, finish_reason,
                    comp.stop_reason, list(comp.token_ids) if request.return_token_ids else None)))
            return events

        role = self._reply_role(request)

        def opening() -> Iterator[str]:
            for i in range(request.n):
                yield event(chat_opening_choice(i, {"role": role, "content": ""}))
                if echo:
                    yield event(chat_opening_choice(i, {"content": echo}))

        def closing() -> Optional[str]:  # the usage chunk, counted once the stream ended
            if not include_usage:
                return None
            return writer.event(None, usage_dict(num_prompt, num_generated))

        async for item in stream_events(opening(), (0, first), outputs, chunks, closing):
            yield item
