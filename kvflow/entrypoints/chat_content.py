"""Message content as a chat template sees it: OpenAI content parts, joined or kept.

A message's ``content`` may be a string or, as the OpenAI API allows, a list of parts
(``{"type": "text", "text": ...}``). Most text-model templates print ``content`` as a
string, so a list would be rendered as its Python repr; vLLM therefore resolves a
*content format* per template: ``string`` joins the text parts with newlines,
``openai`` hands the list over as it is. ``auto`` picks ``openai`` only for templates
that loop over a message's content, as the templates of models that take parts do.
Parts other than text are refused: kvflow serves text models.
"""

from __future__ import annotations

import re
from typing import Any, Optional

CONTENT_FORMATS = ("auto", "string", "openai")

# `{% for part in message['content'] %}` / `message.content` / m / msg (the names templates use)
_LOOPS_OVER_CONTENT = re.compile(
    r"for\s+\w+\s+in\s+(message|msg|m)\s*(\[\s*['\"]content['\"]\s*\]|\.content)")


def resolve_format(content_format: str, template: Optional[str]) -> str:
    """"string" or "openai" for ``content_format`` with this template's text."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format={content_format!r}; choose one of "
                         f"{', '.join(CONTENT_FORMATS)}.")
    if content_format != "auto":
        return content_format
    return "openai" if template and _LOOPS_OVER_CONTENT.search(template) else "string"


def _part_fields(part: Any) -> tuple[Any, Any]:
    if isinstance(part, dict):
        return part.get("type"), part.get("text")
    return getattr(part, "type", None), getattr(part, "text", None)


def text_parts(content: list, where: str) -> list[str]:
    """The texts of a list of content parts; a ValueError naming ``where[j]`` for any
    part that is not text."""
    texts = []
    for j, part in enumerate(content):
        kind, text = _part_fields(part)
        if kind != "text" or not isinstance(text, str):
            raise ValueError(f"{where}[{j}] has type {kind!r}; kvflow serves text models and "
                             "takes only 'text' parts.")
        texts.append(text)
    return texts


def template_content(content: Any, content_format: str, where: str) -> Any:
    """``content`` for the template: a string as is (None as ""), a list of parts joined
    (``string``) or as text-part dicts (``openai``)."""
    if content is None:
        return ""
    if not isinstance(content, list):
        return content
    texts = text_parts(content, where)
    if content_format == "openai":
        return [{"type": "text", "text": t} for t in texts]
    return "\n".join(texts)
