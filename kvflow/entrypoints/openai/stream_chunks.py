"""Streamed chunks built as plain dicts and written with ``json``: the per-token path of SSE.

A stream sends one chunk per choice per engine step. Building each through the
pydantic models (construct, validate, ``model_dump_json(exclude_unset=True)``)
cost 4.7–17 µs a chunk on the API process; these builders take 2.3 µs for a
plain chunk and 7–12 µs with logprobs (benchmarks/sse_overhead.py, figures in
benchmarks/RESULTS.md). The models in protocol.py stay the contract
and the slow twin: each builder names the model whose ``exclude_unset`` dump it
reproduces, with the same keys in the same (field) order, and
tests/server/test_stream_chunks.py compares the two byte for byte.

Invariant: no value is NaN or infinite (logprobs pass through ``clamp_logprob``),
so the encoder refuses them instead of writing JSON that clients cannot parse.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
"""Compact, UTF-8 as is: the same text pydantic writes (floats may differ in form only)."""


class ChunkWriter:
    """Writes the SSE events of one stream; the fields every chunk repeats are rendered once.

    Mirrors ``CompletionStreamResponse`` / ``ChatCompletionStreamResponse``:
    ``{"id", "object", "created", "model", "choices"[, "usage"]}``.
    """

    def __init__(self, request_id: str, object_name: str, created: int, model: str) -> None:
        self._head = (f'data: {{"id":{_encode(request_id)},"object":{_encode(object_name)},'
                      f'"created":{_encode(created)},"model":{_encode(model)},"choices":[')

    def event(self, choice: Optional[dict[str, Any]],
              usage: Optional[dict[str, int]] = None) -> str:
        """``data: <chunk>\\n\\n`` with one choice (or none: the closing usage chunk)."""
        text = self._head + (_encode(choice) if choice is not None else "") + "]"
        if usage is not None:
            text += ',"usage":' + _encode(usage)
        return text + "}\n\n"


def usage_dict(num_prompt_tokens: int, num_generated_tokens: int) -> dict[str, int]:
    """``UsageInfo``."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_generated_tokens,
            "total_tokens": num_prompt_tokens + num_generated_tokens}


def completion_choice(index: int, text: str, logprobs: Optional[dict[str, Any]],
                      finish_reason: Optional[str], stop_reason: Union[None, int, str],
                      prompt_token_ids: Optional[list[int]] = None,
                      token_ids: Optional[list[int]] = None) -> dict[str, Any]:
    """``CompletionResponseChoice``; the two id lists (vLLM's extension) only when given."""
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": finish_reason, "stop_reason": stop_reason}
    if prompt_token_ids is not None:
        choice["prompt_token_ids"] = prompt_token_ids
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(index: int, delta: dict[str, Any], logprobs: Optional[dict[str, Any]],
                finish_reason: Optional[str], stop_reason: Union[None, int, str],
                token_ids: Optional[list[int]] = None) -> dict[str, Any]:
    """``ChatCompletionStreamChoice`` with every field set; ``token_ids`` only when given.

    ``delta`` is a ``DeltaMessage``: ``{"content": ...}``, or role first then content.
    """
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs,
                              "finish_reason": finish_reason, "stop_reason": stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_opening_choice(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    """``ChatCompletionStreamChoice(index, delta, logprobs=None, finish_reason=None)``: the
    role chunk and the echo chunk that open a choice, which never set ``stop_reason``."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
