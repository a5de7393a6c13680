"""--reasoning-parser: a thinking model's <think>...</think> text as reasoning_content,
in whole replies and in streams, whatever the deltas' cuts (reasoning.py)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from chat_stubs import canned_outputs, stub_chat

from kvflow.entrypoints import cli
from kvflow.entrypoints.openai.protocol import ChatCompletionRequest
from kvflow.entrypoints.openai.reasoning import ReasoningSplitter, split_reasoning
from kvflow.entrypoints.openai.serving_base import EnginePrompt
from kvflow.sampling_params import SamplingParams

THOUGHT = "<think>\nThe user greets me; 2+2 is 4.</think>\n\nHello! It is 4."
TEXTS = [THOUGHT, "Hello! It is 4.", "<think>cut off mid-thought", "\n<think>a</th", "<thi", "",
         "x</think>y", "<think></think>answer"]


@pytest.mark.parametrize("parser,text,expected", [
    ("qwen3", THOUGHT, ("\nThe user greets me; 2+2 is 4.", "\n\nHello! It is 4.")),
    ("qwen3", "Hello! It is 4.", (None, "Hello! It is 4.")),  # enable_thinking=False
    ("qwen3", "<think>cut off mid-thought", ("cut off mid-thought", "")),
    ("qwen3", "x</think>y", (None, "x</think>y")),
    ("deepseek_r1", "x</think>y", ("x", "y")),  # the template opened the thinking
    ("deepseek_r1", THOUGHT, ("\nThe user greets me; 2+2 is 4.", "\n\nHello! It is 4.")),
    ("deepseek_r1", "still thinking", ("still thinking", "")),
])
def test_whole_reply_split(parser, text, expected):
    assert split_reasoning(parser, text) == expected


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_streamed_split_equals_whole_split_for_any_cuts(parser):
    rng = random.Random(0)
    for text in TEXTS:
        for _ in range(300):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            splitter = ReasoningSplitter(parser)
            parts = [splitter.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
            reasoning = "".join(r for r, _ in parts)
            assert (reasoning if splitter.thought else None,
                    "".join(c for _, c in parts)) == split_reasoning(parser, text), pieces


def test_unknown_parser_and_the_flag():
    with pytest.raises(ValueError, match="not one of"):
        ReasoningSplitter("granite")
    ns = cli.build_parser().parse_args(["serve", "m", "--reasoning-parser", "qwen3",
                                        "--enable-reasoning"])
    assert (ns.reasoning_parser, ns.enable_reasoning) == ("qwen3", True)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "m", "--reasoning-parser", "granite"])


def test_stream_carries_reasoning_then_content():
    deltas = ["<think>", "\nThe user", " greets me.</th", "ink>\n\nHel", "lo!", ""]
    outs = canned_outputs(deltas)

    async def feed():
        for out in outs[1:]:
            yield 0, out

    async def collect() -> list[dict]:
        request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                        stream=True)
        prompt = EnginePrompt("chatcmpl-1", [1, 2], None, SamplingParams())
        body = stub_chat(reasoning_parser="qwen3")._stream_body(request, prompt, "m", "chatcmpl-1", outs[0],
                                           feed(), "")
        events = [e async for e in body]
        assert events[-1] == "data: [DONE]\n\n"
        return [json.loads(e[6:]) for e in events[:-1]]

    events = asyncio.run(collect())
    from openai.types.chat import ChatCompletionChunk

    for e in events:  # the official client reads every chunk, reasoning_content kept as extra
        ChatCompletionChunk.model_validate(e)
    chunks = [c["choices"][0]["delta"] for c in events]
    assert chunks[0] == {"role": "assistant", "content": ""}
    reasoning = "".join(d.get("reasoning_content", "") for d in chunks)
    content = "".join(d.get("content", "") or "" for d in chunks[1:])
    assert (reasoning, content) == ("\nThe user greets me.", "\n\nHello!")
    assert all("<think>" not in json.dumps(d) and "</think>" not in json.dumps(d) for d in chunks)


def test_whole_reply_has_reasoning_content():
    chat = stub_chat(reasoning_parser="deepseek_r1")
    final = canned_outputs(["x</think>y"])[0]

    async def run_requests(*_: Any):
        yield 0, final

    chat.run_requests = run_requests
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    prompt = EnginePrompt("chatcmpl-1", [1, 2], None, SamplingParams())
    response = asyncio.run(chat._full(request, prompt, "m", "chatcmpl-1", 0.0, ""))
    message = json.loads(response.body)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("x", "y")
