"""ChatKVFlow: a LangChain chat model running kvflow offline through the model's chat template.

    chat = ChatKVFlow(model="Qwen/Qwen2.5-0.5B-Instruct", temperature=0)
    chat.invoke([("system", "Answer briefly."), ("human", "Capital of France?")])

Messages become the ``{"role", "content"}`` dicts Hugging Face chat templates
read; the rendered token ids go to the same engine paths as ``VLLM`` (same
fields, plus ``chat_template`` and ``chat_template_kwargs``). Tools and JSON
output are left to a later change: tool calls and tool results are passed to
the template, but nothing parses tool calls out of the reply.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field

from kvflow.entrypoints.llm import apply_chat_template
from kvflow.integrations.langchain.options import (
    KVFlowOptions,
    generation_info,
    is_worth_a_chunk,
    token_usage,
)
from kvflow.outputs import CompletionOutput, RequestOutput

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool",
          "function": "function"}


class ChatKVFlow(KVFlowOptions, BaseChatModel):
    """A kvflow engine as a LangChain chat model; ``VLLM``'s fields plus the template's."""

    chat_template: Optional[str] = None
    """A Jinja chat template replacing the tokenizer's own (required if it has none)."""

    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra variables for the template, e.g. ``{"enable_thinking": False}`` for Qwen3."""

    def __init__(self, **data: Any) -> None:
        self._reject_unknown_fields(data)
        super().__init__(**data)
        self._start_engine()

    @property
    def _llm_type(self) -> str:
        return "kvflow-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "chat_template": self.chat_template,
                "chat_template_kwargs": self.chat_template_kwargs}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any
                       ) -> LangSmithParams:
        return self._ls_params(super()._get_ls_params(stop=stop, **kwargs), kwargs)

    # ------------------------------------------------------------------ prompt and result
    def _prompt(self, messages: Sequence[BaseMessage]) -> dict[str, list[int]]:
        ids = apply_chat_template(self.client.get_tokenizer(), to_chat_dicts(messages),
                                  chat_template=self.chat_template, **self.chat_template_kwargs)
        return {"prompt_token_ids": ids}

    def _response_metadata(self) -> dict[str, Any]:
        return {"model_name": self.model, "model_provider": "kvflow"}

    def _result(self, out: RequestOutput) -> ChatResult:
        num_prompt = len(out.prompt_token_ids)
        generations = [
            ChatGeneration(
                message=AIMessage(content=c.text, response_metadata=self._response_metadata(),
                                  usage_metadata=_usage(num_prompt, len(c.token_ids))),
                generation_info=generation_info(c))
            for c in out.outputs]
        return ChatResult(generations=generations,
                          llm_output={"token_usage": token_usage([out]), "model_name": self.model})

    def _chunk(self, delta: CompletionOutput, num_prompt: int, num_generated: int
               ) -> ChatGenerationChunk:
        # Usage and metadata ride on the last chunk only: merging chunks adds
        # usage counts and concatenates repeated strings.
        is_last = delta.finish_reason is not None
        message = AIMessageChunk(
            content=delta.text,
            usage_metadata=_usage(num_prompt, num_generated) if is_last else None,
            response_metadata=self._response_metadata() if is_last else {})
        return ChatGenerationChunk(message=message,
                                   generation_info=generation_info(delta) or None)

    # ------------------------------------------------------------------ LangChain hooks
    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None,
                  **kwargs: Any) -> ChatResult:
        params = self._sampling_params(stop, kwargs)
        return self._result(self._generate_finals([self._prompt(messages)], params)[0])

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                         **kwargs: Any) -> ChatResult:
        params = self._sampling_params(stop, kwargs)
        outputs = await self._agenerate_finals([self._prompt(messages)], params)
        return self._result(outputs[0])

    # LangChain's stream()/astream() report each chunk to the callbacks
    # themselves, so these don't call run_manager.on_llm_new_token.
    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        params = self._sampling_params(stop, kwargs)
        prompt = self._prompt(messages)
        num_generated = 0
        for delta in self._stream_deltas(prompt, params):
            num_generated += len(delta.token_ids)
            if is_worth_a_chunk(delta, params):
                yield self._chunk(delta, len(prompt["prompt_token_ids"]), num_generated)

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        params = self._sampling_params(stop, kwargs)
        prompt = self._prompt(messages)
        num_generated = 0
        async for delta in self._astream_deltas(prompt, params):
            num_generated += len(delta.token_ids)
            if is_worth_a_chunk(delta, params):
                yield self._chunk(delta, len(prompt["prompt_token_ids"]), num_generated)


def _usage(num_prompt: int, num_generated: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=num_prompt, output_tokens=num_generated,
                         total_tokens=num_prompt + num_generated)


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the role/content dicts a Hugging Face chat template reads.

    Content blocks must be text (this engine reads no images); an AI message's
    tool calls and a tool message's call id are kept in the OpenAI shape most
    templates expect.
    """
    result = []
    for i, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            role = message.role
        elif message.type in _ROLES:
            role = _ROLES[message.type]
        else:
            raise ValueError(f"messages[{i}] has type {message.type!r}; ChatKVFlow takes "
                             f"{sorted(_ROLES)} messages and ChatMessage.")
        entry: dict[str, Any] = {"role": role, "content": _text(message.content, i)}
        if isinstance(message, AIMessage) and message.tool_calls:
            entry["tool_calls"] = [
                {"type": "function", "id": call.get("id"),
                 "function": {"name": call["name"], "arguments": call["args"]}}
                for call in message.tool_calls]
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
            if message.name:
                entry["name"] = message.name
        result.append(entry)
    return result


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block["text"])
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"messages[{index}] holds a {kind!r} content block; ChatKVFlow "
                             "reads text only.")
    return "".join(parts)
