"""Pydantic models of the OpenAI API as kvflow serves it, with vLLM's extra body fields.

Requests validate types and ranges. Some bounds keep a value from reaching
torch out of range (a seed past int64, a top_k past int32): such a value would
fail the engine step that holds it, and with it every request in the batch.
The others repeat OpenAI's documented ranges, which ``SamplingParams`` enforces
too; stating them here puts them in the OpenAPI document for clients and fuzzers.

Requests ignore unknown fields, as vLLM and OpenAI's own server do, so newer
clients that send fields kvflow does not know still work; the server logs them.
Response models are plain; ``exclude_unset`` dumps leave out what was not set.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_N = 128
"""OpenAI's limit on ``n``: each sample is an engine request."""


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields kept (and logged), NaN and infinity refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ResponseModel(BaseModel):
    """Base of response bodies (and stream chunks)."""


_HAS_EXCLUDE_IF = "exclude_if" in inspect.signature(Field).parameters
"""pydantic >= 2.12; older versions show unset extension fields as null, which is harmless."""


def _extension() -> Any:
    """A field of a vLLM extension: absent from the JSON unless it has a value."""
    if _HAS_EXCLUDE_IF:
        return Field(default=None, exclude_if=lambda v: v is None)
    return Field(default=None)


# ---------------------------------------------------------------------------- errors
class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(ResponseModel):
    """``{"error": {...}}``: what OpenAI's clients parse into an ``APIError``."""

    error: ErrorInfo


# ---------------------------------------------------------------------------- shared
class StreamOptions(RequestModel):
    include_usage: Optional[bool] = False
    """Send one last chunk with the request's token counts (and no choices)."""
    continuous_usage_stats: Optional[bool] = False
    """vLLM's extension: put the running token counts in every chunk."""


class ResponseFormat(RequestModel):
    type: str
    json_schema: Optional[dict[str, Any]] = None


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SamplingFields(RequestModel):
    """Fields both completion endpoints share: OpenAI's, then vLLM's extras."""

    model: Optional[str] = None
    """A name from /v1/models; None means the served model."""
    frequency_penalty: Optional[float] = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(default=None)
    """Token id (as a string, OpenAI's form) -> bias added to its logit, in [-100, 100]."""
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: Optional[int] = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(default=None, ge=0.0)
    """None means 1.0; 0 means greedy."""
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM's extra body fields.
    top_k: Optional[int] = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=1)
    allowed_token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[int] = Field(default=None, ge=0)
    """vLLM's extension: logprobs of the prompt's tokens (and this many alternatives),
    returned as ``prompt_logprobs``; not with ``stream``."""
    return_tokens_as_token_ids: Optional[bool] = None
    """Report logprob tokens as ``token_id:<id>``, for tokens that are not valid UTF-8 alone."""
    return_token_ids: Optional[bool] = None
    """vLLM's extension: add ``prompt_token_ids`` and ``token_ids`` to the choices (streamed
    too), for clients that count tokens exactly or run without a tokenizer."""
    best_of: Optional[int] = None


# ---------------------------------------------------------------------------- completions
PromptField = Union[list[int], list[list[int]], str, list[str]]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: PromptField
    """A string, a list of strings, a list of token ids or a list of such lists."""
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(default=None, ge=0)
    """How many most likely tokens to report per position (plus the sampled one)."""
    max_tokens: Optional[int] = Field(default=16, ge=1)
    suffix: Optional[str] = None
    add_special_tokens: bool = True
    """Whether string prompts get the tokenizer's BOS and friends."""


class PromptLogprob(ResponseModel):
    """One entry of vLLM's ``prompt_logprobs``: a candidate token at a prompt position."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


PromptLogprobs = list[Optional[dict[int, PromptLogprob]]]
"""Per prompt position (None for the first), token id -> its logprob there."""


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[None, int, str] = None
    prompt_token_ids: Optional[list[int]] = _extension()
    token_ids: Optional[list[int]] = _extension()
    prompt_logprobs: Optional[PromptLogprobs] = _extension()


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------------------- chat
class ContentPart(RequestModel):
    type: str
    text: Optional[str] = None


class ChatMessage(RequestModel):
    role: str
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    """Deprecated by OpenAI in favour of ``max_completion_tokens``; still honoured."""
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    # vLLM's extra body fields for chat.
    echo: bool = False
    """Prepend the last message's content when it has the reply's role."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    """The template already writes BOS; adding it again would double it."""
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class ChatLogProb(ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: Optional[list[ChatLogProbsContent]] = None


class ChatResponseMessage(ResponseModel):
    role: str = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    """With ``--reasoning-parser``: the reply's thinking, out of ``content`` (reasoning.py)."""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[None, int, str] = None
    token_ids: Optional[list[int]] = _extension()


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_token_ids: Optional[list[int]] = _extension()
    prompt_logprobs: Optional[PromptLogprobs] = _extension()


class DeltaMessage(ResponseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    """With ``--reasoning-parser``: the thinking this chunk adds (reasoning.py)."""
    tool_calls: Optional[list[dict[str, Any]]] = None
    """With ``--enable-auto-tool-choice``: the reply's calls, in its last chunk (tool_calls.py)."""


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[None, int, str] = None
    token_ids: Optional[list[int]] = _extension()


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------------------- models
class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvflow"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------- tokenization
class TokenizeRequest(RequestModel):
    """POST /tokenize: either ``prompt`` or ``messages`` (rendered with the chat template)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    """Default: True for a prompt, False for messages (the template writes BOS)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False


class TokenizeResponse(ResponseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str
