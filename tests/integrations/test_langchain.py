"""LangChain integration on a tiny random checkpoint (CPU).

The seed snippets of LangChain's vLLM page run with only their import line
changed and a local model path. Greedy outputs are compared with a separate
``kvflow.LLM`` on the same checkpoint; streams must join to the same text and
arrive while the engine is still generating.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import warnings
from typing import Any

import pytest

import langchain_core  # noqa: E402,F401

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.prompts import PromptTemplate  # noqa: E402

from kvflow import LLM, SamplingParams  # noqa: E402
from kvflow.integrations.langchain import VLLM, ChatKVFlow  # noqa: E402
from kvflow.integrations.langchain.chat_models import to_chat_dicts  # noqa: E402

NEW_TOKENS = 16
PROMPTS = ["法国的首都是哪里？", "Hello world! How are you", "def add(a, b):"]
SEED_QUESTION = "第一个宝可梦游戏发布的那一年是哪位美国总统？"
SEED_TEMPLATE = "问题: {question}\n回答: 让我们逐步思考。"


@pytest.fixture(scope="module")
def model_path(checkpoint) -> str:
    return checkpoint("llama")


@pytest.fixture(scope="module")
def reference(model_path) -> LLM:
    """An engine of its own, so the integration is compared with plain kvflow.LLM."""
    return LLM(model_path)


@pytest.fixture(scope="module")
def greedy(model_path) -> VLLM:
    # ignore_eos: a random model may pick EOS early; fixed lengths make streams long.
    return VLLM(model=model_path, temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def chat(greedy, model_path) -> ChatKVFlow:
    # Shares greedy's engine (and so its SharedEngine guard) instead of loading another.
    return ChatKVFlow(model=model_path, client=greedy.client, temperature=0.0,
                      max_new_tokens=NEW_TOKENS, ignore_eos=True)


def _expected(reference: LLM, prompt: str, **overrides: Any) -> str:
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": NEW_TOKENS,
                               "ignore_eos": True, **overrides})
    return reference.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


# ---------------------------------------------------------------------- compatibility
def test_fields_and_defaults_are_langchain_community_vllms():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from langchain_community.llms import VLLM as CommunityVLLM

    ours, theirs = VLLM.model_fields, CommunityVLLM.model_fields
    assert set(ours) == set(theirs)
    for name, field in theirs.items():
        mine = ours[name]
        assert mine.get_default(call_default_factory=True) == \
            field.get_default(call_default_factory=True), name
    assert VLLM.model_fields["max_new_tokens"].default == 512
    assert VLLM.model_fields["top_k"].default == -1


def test_seed_snippets_invoke_and_llmchain(model_path):
    from langchain_classic.chains import LLMChain

    llm = VLLM(model=model_path, trust_remote_code=True, max_new_tokens=128, top_k=10,
               top_p=0.95, temperature=0.8)
    answer = llm.invoke("法国的首都是哪里？")
    assert isinstance(answer, str)
    params = llm._sampling_params(None, {})
    assert (params.max_tokens, params.top_k, params.top_p, params.temperature) == \
        (128, 10, 0.95, 0.8)

    prompt = PromptTemplate.from_template(SEED_TEMPLATE)
    result = LLMChain(prompt=prompt, llm=llm).invoke(SEED_QUESTION)
    assert result["question"] == SEED_QUESTION and isinstance(result["text"], str)


def test_llmchain_and_lcel_pipe_equal_plain_kvflow(greedy, reference):
    from langchain_classic.chains import LLMChain

    prompt = PromptTemplate.from_template(SEED_TEMPLATE)
    expected = _expected(reference, SEED_TEMPLATE.format(question=SEED_QUESTION))
    assert LLMChain(prompt=prompt, llm=greedy).invoke(SEED_QUESTION)["text"] == expected
    assert (prompt | greedy).invoke({"question": SEED_QUESTION}) == expected


def test_tensor_parallel_snippet_reaches_kvflow_llm(model_path, monkeypatch):
    """tensor_parallel_size=4 needs 4 workers; check what reaches kvflow.LLM instead."""
    import kvflow.integrations.langchain.options as options

    handed: dict[str, Any] = {}

    class RecordingLLM:
        def __init__(self, **kwargs: Any) -> None:
            handed.update(kwargs)
            self.llm_engine = object()

    with monkeypatch.context() as patch:
        patch.setattr(options, "LLM", RecordingLLM)
        VLLM(model=model_path, tensor_parallel_size=4, trust_remote_code=True)
    assert handed == {"model": model_path, "tensor_parallel_size": 4, "trust_remote_code": True,
                      "dtype": "auto", "download_dir": None}
    # And the real engine checks it before starting any worker.
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide"):
        VLLM(model=model_path, tensor_parallel_size=3, trust_remote_code=True)


def test_awq_snippet_options_reach_the_engine(model_path):
    """The tiny checkpoint is not AWQ-quantized, so the engine refuses it by name."""
    with pytest.raises(ValueError, match="quantization='awq'"):
        VLLM(model=model_path, trust_remote_code=True, max_new_tokens=512,
             vllm_kwargs={"quantization": "awq"})


def test_awq_seed_snippet_runs(model_path, tmp_path):
    """The seed's AWQ line, on a tiny checkpoint packed in AutoAWQ's GEMM layout."""
    from awq_checkpoints import write_awq_pair

    from kvflow import LLM, SamplingParams

    awq_dir = write_awq_pair(model_path, str(tmp_path), group_size=32).awq_dir
    llm = VLLM(model=awq_dir, trust_remote_code=True, max_new_tokens=512,
               vllm_kwargs={"quantization": "awq"})
    assert isinstance(llm.invoke("What is the capital of France?", max_tokens=8), str)
    greedy = llm.invoke("Hello world", temperature=0.0, max_tokens=8)
    ref = LLM(awq_dir, quantization="awq").generate(
        "Hello world", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert greedy == ref[0].outputs[0].text


def test_bad_options_are_clear_errors(model_path, greedy):
    with pytest.raises(ValueError, match="beam search"):
        VLLM(model=model_path, use_beam_search=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        VLLM(model=model_path, max_tokens=5)
    with pytest.raises(ValueError, match="vllm_kwargs repeats \\['dtype'\\]"):
        VLLM(model=model_path, vllm_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="beam search"):
        greedy.invoke("hi", use_beam_search=True)
    with pytest.raises(ValueError, match="Unknown sampling option.*'tempurature'"):
        greedy.invoke("hi", tempurature=0.5)


# ---------------------------------------------------------------------- blocking calls
def test_invoke_and_batch_equal_plain_kvflow_in_one_engine_batch(greedy, reference,
                                                                  monkeypatch):
    expected = [_expected(reference, p) for p in PROMPTS]
    assert greedy.invoke(PROMPTS[0]) == expected[0]

    batches: list[int] = []
    generate = greedy.client.generate
    monkeypatch.setattr(greedy.client, "generate",
                        lambda prompts, *a, **k: batches.append(len(prompts)) or
                        generate(prompts, *a, **k))
    assert greedy.batch(PROMPTS) == expected
    assert batches == [len(PROMPTS)]


def test_generate_reports_finish_reason_usage_logprobs_and_n(greedy, reference):
    result = greedy.generate(PROMPTS[:2], logprobs=2)
    tokenizer = reference.get_tokenizer()
    num_prompt = sum(len(tokenizer.encode(p)) for p in PROMPTS[:2])
    assert result.llm_output["token_usage"] == {
        "prompt_tokens": num_prompt, "completion_tokens": 2 * NEW_TOKENS,
        "total_tokens": num_prompt + 2 * NEW_TOKENS}
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == "length"
    content = info["logprobs"]["content"]
    assert len(content) == NEW_TOKENS
    assert all(len(t["top_logprobs"]) >= 2 for t in content)
    # Greedy: every chosen token is the most likely one.
    assert all(t["token_id"] == t["top_logprobs"][0]["token_id"] for t in content)

    sampled = greedy.generate(["Hello"], n=2, temperature=1.0, max_new_tokens=4)
    assert len(sampled.generations[0]) == 2


def test_stop_per_call_and_as_field(greedy, reference, model_path):
    text = _expected(reference, PROMPTS[1])
    start = next(i for i in range(3, len(text) - 2)
                 if "\ufffd" not in text[i:i + 2] and text.index(text[i:i + 2]) == i)
    stop = text[start:start + 2]

    result = greedy.generate([PROMPTS[1]], stop=[stop]).generations[0][0]
    assert result.text == text[:start]
    assert result.generation_info["finish_reason"] == "stop"
    assert result.generation_info["stop_reason"] == stop
    assert "".join(greedy.stream(PROMPTS[1], stop=[stop])) == text[:start]

    stopping = VLLM(model=model_path, client=greedy.client, temperature=0.0,
                    max_new_tokens=NEW_TOKENS, ignore_eos=True, stop=[stop])
    assert stopping.invoke(PROMPTS[1]) == text[:start]
    assert stopping.invoke(PROMPTS[1], stop=["\x00never"]) == text  # a call's stop replaces


def test_keyword_overrides(greedy, reference):
    assert greedy.invoke(PROMPTS[0], max_new_tokens=4) == \
        _expected(reference, PROMPTS[0], max_tokens=4)
    assert greedy.bind(max_tokens=3).invoke(PROMPTS[0]) == \
        _expected(reference, PROMPTS[0], max_tokens=3)


def test_stream_is_token_by_token_and_joins_to_invoke(greedy):
    handler = _Tokens()
    chunks = list(greedy.stream(PROMPTS[0], config={"callbacks": [handler]}))
    assert len(chunks) > 1
    assert "".join(chunks) == greedy.invoke(PROMPTS[0])
    assert handler.tokens == chunks

    # The first chunk comes while the engine is still generating the rest.
    engine = greedy.client.llm_engine
    stream = greedy.stream(PROMPTS[0])
    next(stream)
    assert engine.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="already in use on this thread"):
        greedy.invoke(PROMPTS[1])  # would deadlock; the guard says why instead
    stream.close()  # aborts the request and frees its blocks
    assert not engine.has_unfinished_requests()
    engine.scheduler.check_integrity()
    with pytest.raises(ValueError, match="n=2"):
        list(greedy.stream(PROMPTS[0], n=2))


# ---------------------------------------------------------------------- async
def test_async_calls_equal_blocking_ones(greedy):
    expected = greedy.batch(PROMPTS)

    async def run() -> tuple[str, list[str], list[str]]:
        async def collect(prompt: str) -> list[str]:
            return [c async for c in greedy.astream(prompt)]

        # All at once: one async session, batched by the AsyncLLM.
        return await asyncio.gather(greedy.ainvoke(PROMPTS[0]), collect(PROMPTS[1]),
                                    greedy.abatch(PROMPTS))

    text, chunks, batch = asyncio.run(run())
    assert text == expected[0]
    assert len(chunks) > 1 and "".join(chunks) == expected[1]
    assert batch == expected
    # A second event loop gets a fresh AsyncLLM over the same engine.
    assert asyncio.run(greedy.ainvoke(PROMPTS[2])) == expected[2]
    assert greedy.invoke(PROMPTS[2]) == expected[2]


def test_async_stream_left_early_frees_the_engine(greedy):
    engine = greedy.client.llm_engine
    expected = greedy.invoke(PROMPTS[1])

    async def left_early() -> None:
        stream = greedy.astream(PROMPTS[0])
        await stream.__anext__()
        assert engine.has_unfinished_requests()
        await stream.aclose()

    async def run() -> None:
        # LangChain's astream leaves our inner generator to the garbage collector.
        # Until it runs, the request still ends on its own and hands the engine
        # back, so a blocking call from another thread does not wait for the GC.
        gc.disable()
        try:
            await left_early()
            text = await asyncio.wait_for(asyncio.to_thread(greedy.invoke, PROMPTS[1]), 30)
            assert text == expected
        finally:
            gc.enable()
        # Once collected, a generator whose request still runs aborts it.
        await left_early()
        gc.collect()
        for _ in range(20):
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert not engine.has_unfinished_requests()

    asyncio.run(run())
    engine.scheduler.check_integrity()


def test_blocking_and_async_callers_take_turns(greedy, chat):
    """Threads calling invoke and an event loop calling abatch, on one engine at once."""
    expected = greedy.batch(PROMPTS)
    errors: list[BaseException] = []

    def blocking() -> None:
        try:
            for _ in range(3):
                assert greedy.batch(PROMPTS) == expected
                assert "".join(c.content for c in chat.stream("hi")) == chat.invoke("hi").content
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    async def concurrent() -> list[list[str]]:
        return await asyncio.gather(*(greedy.abatch(PROMPTS) for _ in range(3)))

    threads = [threading.Thread(target=blocking) for _ in range(2)]
    for t in threads:
        t.start()
    results = asyncio.run(concurrent())
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [expected] * 3
    assert not greedy.client.llm_engine.has_unfinished_requests()


# ---------------------------------------------------------------------- chat model
def test_chat_invoke_and_stream_use_the_chat_template(chat, reference):
    messages = [SystemMessage("Be brief."), HumanMessage("What is the capital of France?")]
    expected = reference.chat(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
        use_tqdm=False)[0]

    reply = chat.invoke(messages)
    assert isinstance(reply, AIMessage)
    assert reply.content == expected.outputs[0].text
    assert reply.usage_metadata == {"input_tokens": len(expected.prompt_token_ids),
                                    "output_tokens": NEW_TOKENS,
                                    "total_tokens": len(expected.prompt_token_ids) + NEW_TOKENS}
    assert reply.response_metadata["finish_reason"] == "length"

    handler = _Tokens()
    chunks = list(chat.stream(messages, config={"callbacks": [handler]}))
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(handler.tokens) == reply.content  # reported once each, by LangChain
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.content == reply.content
    assert merged.usage_metadata == reply.usage_metadata

    async def run() -> tuple[AIMessage, str]:
        text = "".join([c.content async for c in chat.astream(messages)])
        return await chat.ainvoke(messages), text

    areply, atext = asyncio.run(run())
    assert areply.content == atext == reply.content


def test_messages_become_template_dicts():
    ai = AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1"}])
    dicts = to_chat_dicts([SystemMessage("s"), HumanMessage([{"type": "text", "text": "h"}]),
                           ai, ToolMessage("2", tool_call_id="c1")])
    assert dicts == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "h"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "id": "c1",
                         "function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "2", "tool_call_id": "c1"}]
    with pytest.raises(ValueError, match="reads text only"):
        to_chat_dicts([HumanMessage([{"type": "image_url", "image_url": {"url": "x"}}])])


# ---------------------------------------------------------------------- optional extra
def test_missing_langchain_core_names_the_install_command():
    code = (
        "import sys\n"
        "sys.modules['langchain_core'] = None  # as if it were not installed\n"
        "import kvflow.integrations\n"
        "try:\n"
        "    import kvflow.integrations.langchain\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('imported without langchain-core')\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "kvflow[langchain]"' in proc.stdout
