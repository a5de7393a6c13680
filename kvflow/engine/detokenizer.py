"""Incremental detokenization and stop strings.

Why offsets: decoding the whole output at every step costs O(n) per token.
Decoding only a short window, ``ids[prefix_offset:]``, against the text of
``ids[prefix_offset:read_offset]`` gives the new characters in O(1), and the
window's left context keeps word-initial spaces right. A window ending in
U+FFFD is half of a multi-byte character: its text waits for the next token.
"""

from __future__ import annotations

from typing import Any, Optional

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The text of one sequence, grown token by token; cut at a stop string."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], *, skip_special_tokens: bool,
                 spaces_between_special_tokens: bool, stop: list[str],
                 include_stop_str_in_output: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        # Start the window inside the prompt so the first token gets its left context.
        self.ids: list[int] = list(prompt_token_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_context = len(self.ids)
        self.text = ""
        self.stop_hold = max((len(s) for s in stop), default=1) - 1 if not self.include_stop else 0

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def update(self, new_token_ids: list[int]) -> Optional[str]:
        """Appends tokens; returns the stop string if one now ends the text."""
        stop_hit: Optional[str] = None
        for token in new_token_ids:
            self.ids.append(token)
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            new_text = self._decode(self.ids[self.prefix_offset:])
            if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
                continue  # nothing printable yet (special token skipped, or half a character)
            before = len(self.text)
            self.text += new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            stop_hit = self._check_stop(before)
            if stop_hit is not None:
                break
        return stop_hit

    def _check_stop(self, new_from: int) -> Optional[str]:
        for s in self.stop:
            start = max(0, new_from - len(s) + 1)
            idx = self.text.find(s, start)
            if idx != -1:
                self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                return s
        return None

    def flush(self) -> None:
        """At an end not caused by a stop string: emits text held back as half a character."""
        tail = self._decode(self.ids[self.prefix_offset:])
        head = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if len(tail) > len(head):
            self.text += tail[len(head):]
            self.prefix_offset = self.read_offset = len(self.ids)

    def streamable_len(self, finished: bool) -> int:
        """Characters safe to send: all at the end, else all but a possible stop-string prefix."""
        if finished or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - self.stop_hold)
