"""--enable-auto-tool-choice --tool-call-parser hermes: a model's <tool_call> blocks become
the reply's tool_calls, whole and streamed (tool_calls.py), and the route's rules."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from chat_stubs import canned_outputs, stub_chat

from kvflow.entrypoints.openai.errors import APIError
from kvflow.entrypoints.openai.protocol import ChatCompletionRequest
from kvflow.entrypoints.openai.server import ServerArgs, check_server_args
from kvflow.entrypoints.openai.serving_base import EnginePrompt
from kvflow.entrypoints.openai.tool_calls import ToolCallStream, parse_tool_calls
from kvflow.sampling_params import SamplingParams

CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
         '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
         '</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
         {"type": "function", "function": {"name": "add", "parameters": {}}}]


def test_parse_whole_reply():
    content, calls = parse_tool_calls(CALLS)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in calls}) == 2 and calls[0].id.startswith("chatcmpl-tool-")
    assert parse_tool_calls("just text") == ("just text", [])
    bad = "x <tool_call>{not json</tool_call>"
    assert parse_tool_calls(bad) == (bad, [])  # not a call: stays text
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name
    only = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{}"}</tool_call>')
    assert only[0] is None and only[1][0].arguments == "{}"


def test_stream_sends_the_text_before_the_first_call_whatever_the_cuts():
    rng = random.Random(0)
    for text in (CALLS, "no calls, ends in <tool", "x <tool_call>{bad json</tool_call>", ""):
        _, calls = parse_tool_calls(text)
        for _ in range(200):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            stream = ToolCallStream()
            sent = "".join(stream.feed(p) for p in pieces)
            rest, streamed_calls = stream.finish()
            assert [c.name for c in streamed_calls] == [c.name for c in calls]
            assert sent + rest == (text[:text.find("<tool_call>")] if calls else text), pieces


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Weather in Paris?"}],
                                 tools=TOOLS, **fields)


def test_whole_reply_carries_tool_calls():
    chat = stub_chat(tool_parser="hermes")
    final = canned_outputs([CALLS])[0]

    async def run_requests(*_: Any):
        yield 0, final

    chat.run_requests = run_requests
    prompt = EnginePrompt("chatcmpl-1", [1, 2], None, SamplingParams())
    response = asyncio.run(chat._full(_request(), prompt, "m", "chatcmpl-1", 0.0, ""))
    choice = json.loads(response.body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == [
        "get_weather", "add"]
    assert json.loads(choice["message"]["tool_calls"][1]["function"]["arguments"]) == {
        "a": 1, "b": 2}
    # The official client reads it as it reads OpenAI's.
    from openai.types.chat import ChatCompletion

    parsed = ChatCompletion.model_validate(json.loads(response.body))
    assert parsed.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_stream_ends_with_the_calls():
    chat = stub_chat(tool_parser="hermes")
    deltas = ["Let me", " check.\n<tool", "_call>\n{\"name\": \"get_weather\", ",
              "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", ""]
    outs = canned_outputs(deltas)

    async def feed():
        for out in outs[1:]:
            yield 0, out

    async def collect() -> list[dict]:
        prompt = EnginePrompt("chatcmpl-1", [1, 2], None, SamplingParams())
        body = chat._stream_body(_request(stream=True), prompt, "m", "chatcmpl-1", outs[0],
                                 feed(), "")
        events = [e async for e in body]
        return [json.loads(e[6:]) for e in events[:-1]]

    chunks = asyncio.run(collect())
    from openai.types.chat import ChatCompletionChunk

    last_chunk = ChatCompletionChunk.model_validate(chunks[-1])  # the client's own reading
    assert last_chunk.choices[0].delta.tool_calls[0].function.name == "get_weather"
    choices = [c["choices"][0] for c in chunks]
    content = "".join(c["delta"].get("content") or "" for c in choices)
    assert content == "Let me check.\n"
    last = choices[-1]
    assert last["finish_reason"] == "tool_calls"
    (call,) = last["delta"]["tool_calls"]
    assert (call["index"], call["type"], call["function"]["name"]) == (0, "function",
                                                                       "get_weather")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_route_rules_and_flags():
    prompt_check = stub_chat()
    with pytest.raises(APIError, match="--enable-auto-tool-choice --tool-call-parser hermes"):
        asyncio.run(prompt_check.create_chat_completion(_request(), None))
    with pytest.raises(APIError, match="forces a call"):
        asyncio.run(stub_chat(tool_parser="hermes").create_chat_completion(_request(tool_choice="required"),
                                                           None))
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        check_server_args(ServerArgs(enable_auto_tool_choice=True))
    check_server_args(ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes"))
