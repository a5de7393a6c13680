"""Streamed chunks are written as dicts (stream_chunks.py), not through the protocol models.

These tests hold the fast path to its slow twin: the stream bodies of both
endpoints run on canned engine outputs, and every event must equal, byte for
byte, the ``model_dump_json(exclude_unset=True)`` of the pydantic chunk built
from the same outputs the way the models describe it.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from kvflow.entrypoints.openai.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbsContent,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponseChoice,
    CompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
)
from kvflow.entrypoints.openai.serving_base import MIN_LOGPROB, EnginePrompt
from kvflow.entrypoints.openai.serving_chat import OpenAIServingChat
from kvflow.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvflow.entrypoints.openai.stream_chunks import ChunkWriter, completion_choice
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import SamplingParams

PROMPT_IDS = [1, 2, 3]
PROMPT_TEXT = "a prompt"
TEXTS = [" Hello", ", wörld", "\x1f ☃.", ""]
"""Per step; non-ASCII and a control character check the JSON escaping; the last step
finishes with no new text (a stop string held back)."""


class _Tokenizer:
    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(f"<{i}>" for i in ids)


def _serving(cls: type) -> Any:
    engine = SimpleNamespace(get_tokenizer=_Tokenizer,
                             model_config=SimpleNamespace(max_model_len=512, vocab_size=1000,
                                                          sampling_defaults={}))
    return cls(engine, served_model_names=["m"], metrics=None)


def _entry(token: int, step: int, with_logprobs: bool) -> Optional[dict[int, Logprob]]:
    """The sampled token (rank 1) and two alternatives, one of them impossible (-inf)."""
    if not with_logprobs:
        return None
    return {token: Logprob(-0.25 * (step + 1), 1, TEXTS[step] or "<eos>"),
            500 + step: Logprob(-1.5, 2, f" alt{step}"),
            600 + step: Logprob(float("-inf"), 3, None)}


def _outputs(n: int, with_logprobs: bool) -> list[RequestOutput]:
    """One DELTA output per step; every sample gains one token; the last step ends them all
    (sample 0 on the stop string ".", the others by length)."""
    outs = []
    for step, text in enumerate(TEXTS):
        last = step == len(TEXTS) - 1
        comps = []
        for j in range(n):
            token = 10 + 10 * step + j
            entry = _entry(token, step, with_logprobs)
            comps.append(CompletionOutput(
                index=j, text=text, token_ids=[token], cumulative_logprob=None,
                logprobs=[entry] if entry is not None else None,
                finish_reason=("stop" if j == 0 else "length") if last else None,
                stop_reason="." if last and j == 0 else None))
        outs.append(RequestOutput("r", PROMPT_TEXT, PROMPT_IDS, None, comps, finished=last))
    return outs


def _collect(body: Any) -> list[str]:
    async def main() -> list[str]:
        return [event async for event in body]
    events = asyncio.run(main())
    assert events[-1] == "data: [DONE]\n\n"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and event.endswith("\n\n"), event
        payloads.append(event[len("data: "):-2])
    return payloads


async def _feed(outs: list[RequestOutput]):
    for out in outs:
        yield 0, out


def _stream_completion(outs: list[RequestOutput], **fields: Any) -> list[str]:
    request = CompletionRequest(prompt=PROMPT_TEXT, stream=True, **fields)
    prompt = EnginePrompt("cmpl-1", PROMPT_IDS, PROMPT_TEXT, SamplingParams())
    body = _serving(OpenAIServingCompletion)._stream_body(
        request, [prompt], "m", "cmpl-1", (0, outs[0]), _feed(outs[1:]))
    return _collect(body)


def _stream_chat(outs: list[RequestOutput], echo: str = "", **fields: Any) -> list[str]:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stream=True,
                                    **fields)
    prompt = EnginePrompt("chatcmpl-1", PROMPT_IDS, None, SamplingParams())
    body = _serving(OpenAIServingChat)._stream_body(
        request, prompt, "m", "chatcmpl-1", outs[0], _feed(outs[1:]), echo)
    return _collect(body)


def _assert_same(fast: list[str], reference: list[Any]) -> None:
    expected = [chunk.model_dump_json(exclude_unset=True) for chunk in reference]
    assert fast == expected


def _created(fast: list[str]) -> int:
    return json.loads(fast[0])["created"]


def _reference_chunk(cls: type, chunk_id: str, obj: str, fast: list[str], choices: list,
                     usage: Optional[UsageInfo]) -> Any:
    """The pydantic chunk the fast writer's JSON must equal (``usage`` set only if given,
    as ``exclude_unset`` then leaves it out)."""
    chunk = cls(id=chunk_id, object=obj, created=_created(fast), model="m", choices=choices)
    if usage is not None:
        chunk.usage = usage
    return chunk


# ---------------------------------------------------------------------------- completions
def _completion_chunk(fast: list[str], choices: list[CompletionResponseChoice],
                      usage: Optional[UsageInfo] = None) -> CompletionStreamResponse:
    return _reference_chunk(CompletionStreamResponse, "cmpl-1", "text_completion", fast,
                            choices, usage)


def _usage(num_generated: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=len(PROMPT_IDS), completion_tokens=num_generated,
                     total_tokens=len(PROMPT_IDS) + num_generated)


def test_completion_chunks_match_models():
    outs = _outputs(1, with_logprobs=False)
    fast = _stream_completion(outs)
    reference = []
    for out in outs:
        comp = out.outputs[0]
        reference.append(_completion_chunk(fast, [CompletionResponseChoice(
            index=0, text=comp.text, logprobs=None, finish_reason=comp.finish_reason,
            stop_reason=comp.stop_reason)]))
    _assert_same(fast, reference)
    last = json.loads(fast[-1])["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == "."


def test_completion_logprobs_chunks_match_models():
    outs = _outputs(1, with_logprobs=True)
    fast = _stream_completion(outs, logprobs=2)
    reference = []
    offset = 0
    for step, out in enumerate(outs):
        comp = out.outputs[0]
        entry = comp.logprobs[0]
        token = entry[comp.token_ids[0]].decoded_token
        top = {lp.decoded_token or f"<{tid}>": max(lp.logprob, MIN_LOGPROB)
               for tid, lp in entry.items()}
        logprobs = CompletionLogProbs(text_offset=[offset], token_logprobs=[-0.25 * (step + 1)],
                                      tokens=[token], top_logprobs=[top])
        offset += len(token)
        reference.append(_completion_chunk(fast, [CompletionResponseChoice(
            index=0, text=comp.text, logprobs=logprobs, finish_reason=comp.finish_reason,
            stop_reason=comp.stop_reason)]))
    _assert_same(fast, reference)
    assert json.loads(fast[0])["choices"][0]["logprobs"]["top_logprobs"][0]["<600>"] == -9999.0


def test_completion_n2_token_ids_and_usage_match_models():
    """n=2: choices by index, prompt ids on each choice's first chunk, running usage on
    every chunk and a closing chunk with usage and no choices."""
    outs = _outputs(2, with_logprobs=False)
    fast = _stream_completion(outs, n=2, return_token_ids=True,
                              stream_options={"include_usage": True,
                                              "continuous_usage_stats": True})
    reference = []
    num_generated = 0
    for step, out in enumerate(outs):
        for comp in out.outputs:
            num_generated += 1
            choice = CompletionResponseChoice(index=comp.index, text=comp.text, logprobs=None,
                                              finish_reason=comp.finish_reason,
                                              stop_reason=comp.stop_reason)
            choice.token_ids = list(comp.token_ids)
            if step == 0:
                choice.prompt_token_ids = PROMPT_IDS
            reference.append(_completion_chunk(fast, [choice], _usage(num_generated)))
    reference.append(_completion_chunk(fast, [], _usage(num_generated)))
    _assert_same(fast, reference)


def test_completion_echo_logprobs_starts_with_the_prompt():
    """Echo puts the prompt's text and tokens (first without a logprob) in the first chunk."""
    fast = _stream_completion(_outputs(1, with_logprobs=True), echo=True, logprobs=1)
    first = json.loads(fast[0])["choices"][0]
    assert first["text"] == PROMPT_TEXT + TEXTS[0]
    assert first["logprobs"]["token_logprobs"][:len(PROMPT_IDS)] == [None] * len(PROMPT_IDS)
    for payload in fast:  # the dict parses back into the model unchanged
        again = CompletionStreamResponse.model_validate_json(payload)
        assert again.model_dump_json(exclude_unset=True) == payload


# ---------------------------------------------------------------------------- chat
def _chat_chunk(fast: list[str], choices: list[ChatCompletionStreamChoice],
                usage: Optional[UsageInfo] = None) -> ChatCompletionStreamResponse:
    return _reference_chunk(ChatCompletionStreamResponse, "chatcmpl-1", "chat.completion.chunk",
                            fast, choices, usage)


def _chat_logprobs(comp: CompletionOutput, num_top: int) -> ChatCompletionLogProbs:
    entry = comp.logprobs[0]
    chosen = entry[comp.token_ids[0]]
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:num_top]
    top = []
    for tid, lp in ranked:
        text = lp.decoded_token or f"<{tid}>"
        top.append(ChatLogProb(token=text, logprob=max(lp.logprob, MIN_LOGPROB),
                               bytes=list(text.encode("utf-8"))))
    return ChatCompletionLogProbs(content=[ChatLogProbsContent(
        token=chosen.decoded_token, logprob=chosen.logprob,
        bytes=list(chosen.decoded_token.encode("utf-8")), top_logprobs=top)])


@pytest.mark.parametrize("num_top", [0, 3])
def test_chat_logprobs_and_usage_match_models(num_top):
    outs = _outputs(1, with_logprobs=True)
    fast = _stream_chat(outs, logprobs=True, top_logprobs=num_top,
                        stream_options={"include_usage": True})
    reference = [_chat_chunk(fast, [ChatCompletionStreamChoice(
        index=0, delta=DeltaMessage(role="assistant", content=""), logprobs=None,
        finish_reason=None)])]
    for out in outs:
        comp = out.outputs[0]
        reference.append(_chat_chunk(fast, [ChatCompletionStreamChoice(
            index=0, delta=DeltaMessage(content=comp.text),
            logprobs=_chat_logprobs(comp, num_top), finish_reason=comp.finish_reason,
            stop_reason=comp.stop_reason, token_ids=None)]))
    reference.append(_chat_chunk(fast, [], _usage(len(outs))))
    _assert_same(fast, reference)


def test_chat_n2_echo_token_ids_continuous_usage_match_models():
    outs = _outputs(2, with_logprobs=False)
    fast = _stream_chat(outs, echo="Echo é", n=2, return_token_ids=True,
                        stream_options={"include_usage": True, "continuous_usage_stats": True})
    reference = []
    for i in range(2):
        reference.append(_chat_chunk(fast, [ChatCompletionStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""), logprobs=None,
            finish_reason=None)], _usage(0)))
        reference.append(_chat_chunk(fast, [ChatCompletionStreamChoice(
            index=i, delta=DeltaMessage(content="Echo é"), logprobs=None,
            finish_reason=None)], _usage(0)))
    num_generated = 0
    for out in outs:
        for comp in out.outputs:
            num_generated += 1
            reference.append(_chat_chunk(fast, [ChatCompletionStreamChoice(
                index=comp.index, delta=DeltaMessage(content=comp.text), logprobs=None,
                finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                token_ids=list(comp.token_ids))], _usage(num_generated)))
    reference.append(_chat_chunk(fast, [], _usage(num_generated)))
    _assert_same(fast, reference)


# ---------------------------------------------------------------------------- writer
def test_writer_floats_parse_to_the_models_values():
    """Floats pydantic writes in another form (1e-05 vs 0.00001) still parse equal; a NaN,
    which the logprob clamp rules out, is refused rather than written as invalid JSON."""
    writer = ChunkWriter("cmpl-1", "text_completion", 7, "m")
    logprobs = {"text_offset": [0], "token_logprobs": [-1.2e-05], "tokens": ["a"],
                "top_logprobs": [{"a": -1.2e-05, "b": -1e22}]}
    fast = writer.event(completion_choice(0, "a", logprobs, None, None))
    choice = CompletionResponseChoice(index=0, text="a", logprobs=CompletionLogProbs(**logprobs),
                                      finish_reason=None, stop_reason=None)
    model = CompletionStreamResponse(id="cmpl-1", object="text_completion", created=7,
                                     model="m", choices=[choice])
    expected = model.model_dump_json(exclude_unset=True)
    assert json.loads(fast[len("data: "):]) == json.loads(expected)
    logprobs["token_logprobs"] = [float("nan")]
    with pytest.raises(ValueError):
        writer.event(completion_choice(0, "a", logprobs, None, None))
