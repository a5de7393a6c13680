"""The server through the official ``openai`` client and LangChain, against the offline ``LLM``.

One server process serves the whole module. Greedy requests run one at a
time, so their text must equal what ``kvflow.LLM`` produces offline.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import openai
import pytest
from conftest import MAX_MODEL_LEN, ServerProcess, metric, metrics_values

from kvflow import LLM, SamplingParams
from kvflow.entrypoints.llm import apply_chat_template

NAME = "tiny"
ALIAS = "tiny-alias"
PROMPTS = ["Hello world! How are", "The quick brown fox", "What is the capital of France?"]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerProcess(tiny_model, "--max-model-len", str(MAX_MODEL_LEN),
                        "--served-model-name", NAME, ALIAS,
                        env={"KVFLOW_LOG_STATS_INTERVAL": "0.5"})
    yield srv
    log = srv.log()
    srv.close()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def offline(tiny_model) -> LLM:
    return LLM(tiny_model, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def greedy_texts(offline) -> list[str]:
    outs = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                            use_tqdm=False)
    return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def chat_reference(offline):
    out = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                       use_tqdm=False)[0]
    return out.outputs[0].text, len(out.prompt_token_ids)


# ---------------------------------------------------------------------------- plain routes
def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [NAME, ALIAS]
    body = httpx.get(server.base_url + "/models").json()
    assert body["object"] == "list" and body["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(ALIAS).id == ALIAS
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ping").status_code == 200  # vLLM's SageMaker probe
    assert httpx.post(server.url + "/ping").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    docs = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in docs["paths"] and "/tokenize" in docs["paths"]


def test_tokenize_detokenize(server, offline):
    tok = offline.get_tokenizer()
    r = httpx.post(server.url + "/tokenize", json={"model": NAME, "prompt": PROMPTS[0]}).json()
    assert r["tokens"] == tok.encode(PROMPTS[0]) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == PROMPTS[0]
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == apply_chat_template(tok, CHAT)


# ---------------------------------------------------------------------------- completions
def test_completion_greedy_equals_offline(client, offline, greedy_texts):
    tok = offline.get_tokenizer()
    for prompt, expected in zip(PROMPTS, greedy_texts):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0)
        assert r.object == "text_completion" and r.model == NAME
        assert r.choices[0].text == expected
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(tok.encode(prompt))
        assert r.usage.completion_tokens == MAX_TOKENS
        assert r.usage.total_tokens == r.usage.prompt_tokens + MAX_TOKENS


def test_completion_stream_equals_offline(client, greedy_texts):
    stream = client.completions.create(model=ALIAS, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == greedy_texts[0]
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-1].model == ALIAS


def test_completion_prompt_shapes(client, offline, greedy_texts):
    """A list of strings, one list of ids, a list of id lists: one choice per prompt, in order."""
    tok = offline.get_tokenizer()
    r = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == greedy_texts
    ids = [tok.encode(p) for p in PROMPTS]
    r = client.completions.create(model=NAME, prompt=ids[1], max_tokens=MAX_TOKENS,
                                  temperature=0)
    assert r.choices[0].text == greedy_texts[1]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in r.choices] == greedy_texts
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)


def test_completion_n_and_seed(client):
    def sample(seed: int, stream: bool = False) -> list[str]:
        kwargs = dict(model=NAME, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3,
                      seed=seed)
        if not stream:
            r = client.completions.create(**kwargs)
            assert 0 < r.usage.completion_tokens <= 3 * 8
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        texts = [""] * 3
        for chunk in client.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.text
        return texts

    first = sample(1234)
    assert len(first) == 3
    assert sample(1234) == first  # same seed, same samples
    assert sample(1234, stream=True) == first
    assert len(set(first)) > 1  # the n samples draw from different streams
    assert sample(99) != first


def test_completion_stop_strings(client, greedy_texts):
    text = greedy_texts[0]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2)
                if text[i:i + 2].isascii() and text[i:i + 2].strip())
    expected = text[:text.index(stop)]
    for stream in (False, True):
        kwargs = dict(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                      stop=[stop])
        if stream:
            chunks = list(client.completions.create(**kwargs, stream=True))
            got = "".join(c.choices[0].text for c in chunks)
            last = chunks[-1].choices[0]
        else:
            last = client.completions.create(**kwargs).choices[0]
            got = last.text
        assert got == expected
        assert last.finish_reason == "stop"
        assert last.model_extra["stop_reason"] == stop
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                  temperature=0, stop=stop,
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == expected + stop


def test_completion_logprobs(client, offline):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    ref = offline.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in ref.token_ids]
    for i, (token, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        assert value == pytest.approx(ref.logprobs[i][ref.token_ids[i]].logprob, abs=1e-4)
        assert len(top) == 3 and max(top.values()) == pytest.approx(value)  # greedy: the best
    assert lp.text_offset == sorted(lp.text_offset)
    # Token strings (the default) read back as the text.
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                  logprobs=0)
    assert "".join(r.choices[0].logprobs.tokens) == r.choices[0].text
    assert all(len(t) == 1 for t in r.choices[0].logprobs.top_logprobs)


def test_prompt_logprobs(client, offline):
    ref = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2,
                                                      prompt_logprobs=1), use_tqdm=False)[0]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 1})
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert len(got) == len(ref.prompt_token_ids) and got[0] is None
    for position, token in enumerate(ref.prompt_token_ids[1:], start=1):
        expected = ref.prompt_logprobs[position][token].logprob
        assert got[position][str(token)]["logprob"] == pytest.approx(expected, abs=1e-4)


def test_completion_echo(client, offline, greedy_texts):
    tok = offline.get_tokenizer()
    prompt = PROMPTS[0]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, echo=True)
    assert r.choices[0].text == prompt + greedy_texts[0]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                  echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    num_prompt = len(tok.encode(prompt))
    assert len(lp.tokens) == num_prompt + 4
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == prompt + greedy_texts[0]


def test_completion_extra_body_fields(client, greedy_texts):
    # top_k=1 makes sampling greedy whatever the temperature.
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                  temperature=1.0, extra_body={"top_k": 1, "min_p": 0.0})
    assert r.choices[0].text == greedy_texts[0]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                  logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    ids = [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]
    # A stop token id ends the output on that token.
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"stop_token_ids": [ids[2]]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == ids[2]
    assert r.usage.completion_tokens == ids.index(ids[2]) + 1
    # min_tokens holds the stop token back until enough tokens came.
    r = client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"stop_token_ids": [ids[0]], "min_tokens": 3, "ignore_eos": True,
                    "repetition_penalty": 1.2, "skip_special_tokens": False,
                    "include_stop_str_in_output": False})
    assert r.usage.completion_tokens >= 3


def test_return_token_ids(client, offline):
    ref = offline.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                           use_tqdm=False)[0]
    extra = {"return_token_ids": True}
    r = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body=extra)
    choice = r.choices[0].model_extra
    assert choice["token_ids"] == ref.outputs[0].token_ids
    assert choice["prompt_token_ids"] == ref.prompt_token_ids
    streamed = []
    for chunk in client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, extra_body=extra):
        streamed += chunk.choices[0].model_extra["token_ids"]
    assert streamed == ref.outputs[0].token_ids
    plain = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=2)
    assert "token_ids" not in plain.choices[0].model_extra  # absent unless asked for


# ---------------------------------------------------------------------------- chat
def test_chat_greedy_equals_offline(client, chat_reference):
    expected, num_prompt = chat_reference
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == num_prompt and r.usage.completion_tokens == MAX_TOKENS
    r = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                       max_completion_tokens=5)
    assert r.usage.completion_tokens == 5


def test_chat_stream_equals_offline(client, chat_reference):
    expected, num_prompt = chat_reference
    chunks = list(client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == expected
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert chunks[-1].usage.prompt_tokens == num_prompt
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_chat_logprobs_n_seed(client, chat_reference):
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the best
        assert item.bytes == list(item.token.encode("utf-8"))
    assert "".join(i.token for i in content) == r.choices[0].message.content
    kwargs = dict(model=NAME, messages=CHAT, max_tokens=6, temperature=1.0, n=2, seed=7)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    texts = ["", ""]
    finishes = [0, 0]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] += c.finish_reason is not None
    assert texts == [c.message.content for c in a.choices]
    assert finishes == [1, 1]


def test_chat_echo_and_continue(client, offline):
    messages = [{"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Paris is"}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=4, temperature=0,
        extra_body={"echo": True, "add_generation_prompt": False,
                    "continue_final_message": True})
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False,
                       add_generation_prompt=False, continue_final_message=True)[0]
    assert r.choices[0].message.content == "Paris is" + ref.outputs[0].text


# ---------------------------------------------------------------------------- async client
def test_async_client(server, greedy_texts, chat_reference):
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
        r = await client.completions.create(model=NAME, prompt=PROMPTS[2],
                                            max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == greedy_texts[2]
        text = ""
        async for chunk in await client.completions.create(
                model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                stream=True):
            text += chunk.choices[0].text
        assert text == greedy_texts[2]
        r = await client.chat.completions.create(model=NAME, messages=CHAT,
                                                 max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].message.content == chat_reference[0]
        text = ""
        async for chunk in await client.chat.completions.create(
                model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert text == chat_reference[0]
        await client.close()

    asyncio.run(run())


# ---------------------------------------------------------------------------- metrics
def test_metrics_names(server, client):
    client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("kvflow:num_requests_running", "kvflow:num_requests_waiting",
                 "kvflow:kv_cache_usage_perc", "kvflow:prompt_tokens_total",
                 "kvflow:generation_tokens_total", "kvflow:time_to_first_token_seconds_bucket",
                 "kvflow:e2e_request_latency_seconds_bucket",
                 "kvflow:inter_token_latency_seconds_bucket"):
        assert f"\n{name}{{" in text, name
    values = metrics_values(server.url)
    assert metric(values, "kvflow:generation_tokens_total") >= 3
    assert metric(values, "kvflow:time_to_first_token_seconds_count") >= 1
    # vLLM's per-phase request histograms: queue, prefill, decode and mean time per token.
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_time_per_output_token_seconds"):
        assert metric(values, f"kvflow:{name}_count") >= 1, name
        assert metric(values, f"kvflow:{name}_sum") >= 0.0, name


# ---------------------------------------------------------------------------- load
def test_concurrent_streams_with_disconnects(server):
    """200 streams at once; every 4th leaves after two chunks. The rest complete; the
    leavers' requests are aborted, and afterwards nothing runs and no KV block is held."""
    num_streams, max_tokens = 200, 8
    before = metrics_values(server.url)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        leaves = i % 4 == 0
        body = {"model": NAME, "prompt": f"Request {i}: the quick brown fox", "stream": True,
                "temperature": 0, "max_tokens": 400 if leaves else max_tokens,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        events = []
        async with client.stream("POST", "/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if leaves and len(events) == 2:
                    return "left", len(events)
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]]
        assert finishes[-1] == "length" and usage["completion_tokens"] == max_tokens
        return "done", len(events)

    async def run() -> list[tuple[str, int]]:
        limits = httpx.Limits(max_connections=num_streams, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits,
                                     timeout=120) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(num_streams))), timeout=150)

    results = asyncio.run(run())
    assert sum(r == "done" for r, _ in results) == num_streams * 3 // 4
    assert sum(r == "left" for r, _ in results) == num_streams // 4

    aborted_key = "kvflow:request_success_total"
    assert _wait_idle(server.url), "requests still running after the streams ended"
    after = metrics_values(server.url)
    aborted = sum(v for k, v in after.items()
                  if k.startswith(aborted_key) and 'finished_reason="abort"' in k)
    aborted_before = sum(v for k, v in before.items()
                         if k.startswith(aborted_key) and 'finished_reason="abort"' in k)
    assert aborted - aborted_before == num_streams // 4
    assert httpx.get(server.url + "/health").status_code == 200


def test_disconnect_aborts_non_streaming_request(server):
    """A client that gives up on a whole (non-streamed) response frees its request too."""
    def aborted() -> float:
        return sum(v for k, v in metrics_values(server.url).items()
                   if k.startswith("kvflow:request_success_total")
                   and 'finished_reason="abort"' in k)

    before = aborted()
    # 32 samples of 480 tokens: seconds of work, so the client surely leaves first.
    body = {"model": NAME, "prompt": "A long story:", "max_tokens": 480, "ignore_eos": True,
            "n": 32, "temperature": 1.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json=body, timeout=0.3)
    assert _wait_idle(server.url, timeout=5.0)
    assert aborted() == before + 1


def _wait_idle(url: str, timeout: float = 15.0) -> bool:
    """Waits until /metrics shows no running or waiting request and an empty KV cache."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        values = metrics_values(url)
        if (metric(values, "kvflow:num_requests_running") == 0
                and metric(values, "kvflow:num_requests_waiting") == 0
                and metric(values, "kvflow:kv_cache_usage_perc") == 0):
            return True
        time.sleep(0.2)
    return False


def test_serving_benchmark_smoke(server, tmp_path):
    """benchmarks/serving.py against this server: every request completes, figures are sane."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "serving.py"
    spec = importlib.util.spec_from_file_location("serving_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    code = bench.main(["--base-url", server.base_url, "--model", NAME, "--num-prompts", "12",
                       "--input-len", "16", "--output-len", "6", "--token-id-max", "400",
                       "--request-rate", "50", "--result-json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["completed"] == 12 and result["failed"] == 0
    assert result["output_throughput"] > 0 and result["ttft_ms"]["p50"] > 0
    assert result["tpot_ms"]["p99"] >= result["tpot_ms"]["p50"] > 0


# ---------------------------------------------------------------------------- LangChain
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # langchain-community's own
def test_langchain_vllm_openai(server):
    """The seed's code, unchanged but for the URL and the model name."""
    import langchain_community.llms as llms
    llm = llms.VLLMOpenAI(
        openai_api_key="EMPTY",
        openai_api_base=server.base_url,
        model_name=NAME,
        model_kwargs={"stop": ["."]},
    )
    out = llm.invoke("What is the capital of France?")
    assert isinstance(out, str) and "." not in out
    pieces = list(llm.stream("Tell me about Paris"))
    assert pieces and "." not in "".join(pieces)
    assert all("." not in text for text in llm.batch(["Hello", "World"]))


def test_langchain_chat_openai(server, chat_reference):
    import langchain_openai as lc_openai
    from langchain_core.messages import HumanMessage, SystemMessage

    chat = lc_openai.ChatOpenAI(model=NAME, base_url=server.base_url, api_key="EMPTY",
                                max_tokens=MAX_TOKENS, temperature=0)
    messages = [SystemMessage(CHAT[0]["content"]), HumanMessage(CHAT[1]["content"])]
    reply = chat.invoke(messages)
    assert reply.content == chat_reference[0]
    assert reply.usage_metadata["output_tokens"] == MAX_TOKENS
    assert "".join(c.content for c in chat.stream(messages)) == chat_reference[0]


def test_server_logs_its_load_while_busy(server, client):
    """The periodic load line (stats_logger.py) reaches the server's log after work."""
    client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                              temperature=0)
    deadline = time.monotonic() + 10
    while "Avg generation throughput" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(l for l in server.log().splitlines() if "Avg generation throughput" in l)
    assert "Running:" in line and "KV cache usage:" in line and "Prefix cache hit rate:" in line
