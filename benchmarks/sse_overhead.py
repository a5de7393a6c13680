"""Host cost of one streamed SSE chunk of the OpenAI server, on CPU, with no engine.

    python benchmarks/sse_overhead.py [--tokens 256] [--repeats 7]

Why: at S1 load the API process builds one chunk per request per engine step;
what it spends there (bookkeeping, logprob lists, JSON) is time the event loop
does not spend reading the engine. This drives the serving classes' stream
bodies (``_stream_body`` of completions and chat) with canned one-token
``RequestOutput`` deltas, so everything from an engine output to the SSE string
is measured, and nothing else. Prints µs per chunk, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from types import SimpleNamespace
from typing import Any, AsyncGenerator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvflow.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from kvflow.entrypoints.openai.serving_base import EnginePrompt
from kvflow.entrypoints.openai.serving_chat import OpenAIServingChat
from kvflow.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import SamplingParams

NUM_TOP = 5
PROMPT_IDS = list(range(1, 33))


class _Tokenizer:
    """Only what the stream bodies call when a logprob carries no text (never, here)."""

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(f"<{i}>" for i in ids)


def _engine() -> Any:
    return SimpleNamespace(get_tokenizer=lambda: _Tokenizer(),
                           model_config=SimpleNamespace(max_model_len=4096, vocab_size=32000))


def _outputs(num_tokens: int, n: int, with_logprobs: bool) -> list[RequestOutput]:
    """One DELTA output per step: each of the n samples gains one token; the last ends."""
    outs = []
    for step in range(num_tokens):
        last = step == num_tokens - 1
        comps = []
        for j in range(n):
            token = 100 + (step * 7 + j) % 1000
            logprobs = None
            if with_logprobs:
                entry = {token: Logprob(-0.25, 1, f" w{token}")}
                for k in range(NUM_TOP):
                    entry[2000 + k] = Logprob(-1.5 - k, k + 2, f" alt{k}")
                logprobs = [entry]
            comps.append(CompletionOutput(index=j, text=f" w{token}", token_ids=[token],
                                          cumulative_logprob=None, logprobs=logprobs,
                                          finish_reason="length" if last else None))
        outs.append(RequestOutput("r", None, PROMPT_IDS, None, comps, finished=last))
    return outs


async def _feed(outs: list[RequestOutput]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    for out in outs:
        yield 0, out


async def _drain(body: Any) -> tuple[int, float]:
    """(chunks, seconds) of reading the whole body, timed inside the running loop."""
    count = 0
    start = time.perf_counter()
    async for _ in body:
        count += 1
    return count, time.perf_counter() - start


def _body(kind: str, request: Any, outs: list[RequestOutput]) -> Any:
    prompt = EnginePrompt("r", PROMPT_IDS, "a prompt", SamplingParams())
    gen = _feed(outs[1:])
    if kind == "completion":
        serving = OpenAIServingCompletion(_engine(), served_model_names=["m"], metrics=None)
        return serving._stream_body(request, [prompt], "m", "cmpl-1", (0, outs[0]), gen)
    serving = OpenAIServingChat(_engine(), served_model_names=["m"], metrics=None)
    return serving._stream_body(request, prompt, "m", "chatcmpl-1", outs[0], gen, "")


CASES = [
    ("completion", "completion, n=1",
     dict(prompt="a prompt", stream=True), 1, False),
    ("completion", "completion, logprobs=5",
     dict(prompt="a prompt", stream=True, logprobs=NUM_TOP), 1, True),
    ("completion", "completion, n=4, usage every chunk",
     dict(prompt="a prompt", stream=True, n=4,
          stream_options={"include_usage": True, "continuous_usage_stats": True}), 4, False),
    ("chat", "chat, n=1",
     dict(messages=[{"role": "user", "content": "hi"}], stream=True), 1, False),
    ("chat", "chat, logprobs top 5",
     dict(messages=[{"role": "user", "content": "hi"}], stream=True, logprobs=True,
          top_logprobs=NUM_TOP), 1, True),
    ("chat", "chat, include_usage",
     dict(messages=[{"role": "user", "content": "hi"}], stream=True,
          stream_options={"include_usage": True}), 1, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("| case | chunks | µs / chunk |")
    print("|---|---|---|")
    for kind, name, fields, n, with_logprobs in CASES:
        model = CompletionRequest if kind == "completion" else ChatCompletionRequest
        request = model(**fields)
        outs = _outputs(args.tokens, n, with_logprobs)
        best = float("inf")
        num_chunks = 0
        for _ in range(args.repeats):
            body = _body(kind, request, outs)
            num_chunks, seconds = asyncio.run(_drain(body))
            best = min(best, seconds)
        print(f"| {name} | {num_chunks} | {best / num_chunks * 1e6:.1f} |")


if __name__ == "__main__":
    main()
