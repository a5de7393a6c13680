"""A chat route over canned engine outputs: drives the reply code (parsers, chunks) with
texts a tiny random model would never write."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kvflow.entrypoints.openai.serving_chat import OpenAIServingChat
from kvflow.outputs import CompletionOutput, RequestOutput


class StubTokenizer:
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(f"<{i}>" for i in ids)


def stub_chat(**kwargs: Any) -> OpenAIServingChat:
    """The chat route on a stand-in engine (no model), with ``kwargs`` as the server's."""
    engine = SimpleNamespace(get_tokenizer=StubTokenizer, model_config=SimpleNamespace(
        max_model_len=512, vocab_size=1000, sampling_defaults={}))
    return OpenAIServingChat(engine, served_model_names=["m"], metrics=None, **kwargs)


def canned_outputs(deltas: list[str]) -> list[RequestOutput]:
    """One DELTA output per text, one token each; the last ends the reply (stop)."""
    return [RequestOutput("r", None, [1, 2], None, [CompletionOutput(
        index=0, text=d, token_ids=[10 + i], cumulative_logprob=None, logprobs=None,
        finish_reason="stop" if i == len(deltas) - 1 else None)],
        finished=i == len(deltas) - 1) for i, d in enumerate(deltas)]
