"""Tool calls out of a model's text: the ``hermes`` format (Qwen2.5/Qwen3, Hermes, ...).

vLLM's ``--enable-auto-tool-choice --tool-call-parser hermes`` turns what such a model
writes for a call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

into the OpenAI reply's ``tool_calls`` (``finish_reason: "tool_calls"``), the text
before the first call staying ``content``. kvflow parses the same format. Streamed,
the text before a call streams as usual; from ``<tool_call>`` on, the stream holds the
rest back and ends with one delta carrying the parsed calls (one entry per call,
arguments whole), which OpenAI clients accumulate like any other.

A block whose JSON does not parse, or has no name, is not a call: the reply keeps it
as text, as vLLM does, rather than failing the request.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from kvflow.entrypoints.openai.reasoning import partial_tag_at_end

PARSERS = ("hermes",)
START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)(?:" + re.escape(END) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """The arguments object as JSON text (OpenAI's ``function.arguments``)."""
    id: str

    def to_dict(self, index: Optional[int] = None) -> dict[str, Any]:
        """The reply's ``tool_calls`` entry; with ``index``, a stream delta's."""
        call: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_tool_calls(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content before the first call, or None if empty; the calls) of a whole reply.

    Without a parseable call the whole text is content and the list is empty.
    """
    start = text.find(START)
    if start < 0:
        return text, []
    calls = []
    for match in _BLOCK.finditer(text, start):
        try:
            payload = json.loads(match.group(1).strip())
        except json.JSONDecodeError:
            return text, []
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return text, []
        arguments = payload.get("arguments", payload.get("parameters", {}))
        calls.append(ToolCall(payload["name"], arguments if isinstance(arguments, str)
                              else json.dumps(arguments, ensure_ascii=False),
                              f"chatcmpl-tool-{uuid.uuid4().hex}"))
    content = text[:start].rstrip()
    return (content or None), calls


class ToolCallStream:
    """Streams the text before a reply's first ``<tool_call>``; holds the rest back."""

    def __init__(self) -> None:
        self._text = ""  # the whole reply so far
        self._sent = 0  # characters of it streamed as content

    def feed(self, delta: str) -> str:
        """The content this delta may stream now."""
        self._text += delta
        start = self._text.find(START)
        limit = start if start >= 0 else len(self._text) - partial_tag_at_end(self._text, START)
        out = self._text[self._sent:limit] if limit > self._sent else ""
        self._sent = max(self._sent, limit)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: (content still to stream, the calls). Held-back text that is no
        call after all (bad JSON, a lone ``<tool``) streams as content."""
        _, calls = parse_tool_calls(self._text)
        rest = "" if calls else self._text[self._sent:]
        self._sent = len(self._text)
        return rest, calls

