"""Reasoning parsers: a thinking model's ``<think>…</think>`` text as ``reasoning_content``.

vLLM's ``--reasoning-parser`` splits what a thinking model writes between its think
tags out of the reply's ``content`` into ``reasoning_content``, in whole responses and
in streamed deltas; clients of Qwen3 and DeepSeek-R1 servers read that field. kvflow
takes the same flag and the same two parsers:

- ``qwen3``: the reply must open its thinking with ``<think>`` (Qwen3 writes it; with
  ``enable_thinking=False`` it writes none, and everything is content). Thinking not
  closed by ``</think>`` yet (or ever, when the reply was cut off) is reasoning.
- ``deepseek_r1``: the chat template already opened the thinking, so everything up to
  ``</think>`` is reasoning, with or without a leading ``<think>``.

The tags themselves are dropped from both fields. A streamed split equals the split
of the whole text however the deltas cut it: a tag cut across two deltas is held back
until it is whole.
"""

from __future__ import annotations

from typing import Optional

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1")


class ReasoningSplitter:
    """Splits one reply's text, fed as deltas, into (reasoning, content) deltas."""

    def __init__(self, parser: str) -> None:
        if parser not in PARSERS:
            raise ValueError(f"reasoning parser {parser!r} is not one of {PARSERS}.")
        # Without a leading <think>, qwen3 answers at once; deepseek_r1 thinks regardless.
        self._no_tag_state = "answer" if parser == "qwen3" else "thinking"
        self._state = "start"  # start -> thinking -> answer, or start -> answer
        self._pending = ""  # text that may still turn out to be (part of) a tag
        self.thought = False
        """True once the reply entered its thinking."""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and content text this delta adds (either may be empty).

        ``final``: no more text follows, so nothing is held back.
        """
        text = self._pending + delta
        self._pending = ""
        reasoning, content = [], []
        while text:
            if self._state == "start":  # does the reply open with <think>?
                stripped = text.lstrip()
                if stripped.startswith(START):
                    text, self._state = stripped[len(START):], "thinking"
                elif START.startswith(stripped) and not final:
                    self._pending, text = text, ""  # could still become <think>
                else:
                    self._state = self._no_tag_state
                self.thought = self._state == "thinking"
            elif self._state == "thinking":
                end = text.find(END)
                if end >= 0:
                    reasoning.append(text[:end])
                    text, self._state = text[end + len(END):], "answer"
                else:
                    keep = 0 if final else partial_tag_at_end(text, END)
                    reasoning.append(text[:len(text) - keep])
                    self._pending, text = text[len(text) - keep:], ""
            else:  # answer
                content.append(text)
                text = ""
        if final and self._pending:  # only a start state can hold text back at the end
            content.append(self._pending)
            self._pending = ""
        return "".join(reasoning), "".join(content)


def split_reasoning(parser: str, text: str) -> tuple[Optional[str], str]:
    """(reasoning_content, content) of a whole reply; reasoning is None without thinking."""
    splitter = ReasoningSplitter(parser)
    reasoning, content = splitter.feed(text, final=True)
    return (reasoning if splitter.thought else None), content


def partial_tag_at_end(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``: what a
    stream holds back in case the next delta completes the tag (also tool_calls.py)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
