"""vLLM's prompt types (``vllm.inputs``), so ``from kvflow.inputs import TokensPrompt`` (or
``from kvflow import TokensPrompt``) replaces vLLM's import unchanged.

They are plain dicts: ``LLM.generate``, ``LLM.chat``'s result prompts and
``AsyncLLM.generate`` take them as they take any ``{"prompt": ...}`` or
``{"prompt_token_ids": [...]}`` dict, besides a string or a list of token ids.
"""

from __future__ import annotations

from typing import TypedDict, Union

try:
    from typing import NotRequired
except ImportError:  # Python 3.10; typing_extensions comes with torch
    from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    """A prompt as text; the engine tokenizes it."""

    prompt: str


class TokensPrompt(TypedDict):
    """A prompt as token ids (``prompt``: its text, for the outputs only)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]


PromptType = Union[str, TextPrompt, TokensPrompt, list[int]]
"""Every prompt form the engine takes."""
