"""``build_app`` in this process through httpx's ASGI transport: the paths a subprocess
server would need its own start for (no tokenizer, a --chat-template override), with the
engine in its core process and in this one."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from kvflow.config import EngineArgs
from kvflow.engine.async_llm import AsyncLLM
from kvflow.entrypoints.llm import apply_chat_template
from kvflow.entrypoints.openai.server import ServerArgs, build_app, load_chat_template

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def _run(async_llm: AsyncLLM, args: ServerArgs, scenario) -> None:
    async def main() -> None:
        app = build_app(async_llm, args)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            try:
                await scenario(client)
            finally:
                await async_llm.shutdown()

    asyncio.run(main())


def test_without_tokenizer_token_ids_stream(tiny_model):
    """skip_tokenizer_init (the benchmarks' setup): ids in, one chunk per token out."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128,
                                               skip_tokenizer_init=True))

    async def scenario(client: httpx.AsyncClient) -> None:
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True}
        r = await client.post("/v1/completions", json=body)
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert sum(len(c["token_ids"]) for c in chunks) == 5
        assert chunks[0]["prompt_token_ids"] == [5, 6, 7, 8]
        assert chunks[-1]["finish_reason"] == "length"
        r = await client.post("/v1/completions", json={"prompt": "text", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = await client.post("/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = await client.post("/detokenize", json={"tokens": [5]})
        assert r.status_code == 400

    _run(llm, ServerArgs(served_model_names=["ids-only"]), scenario)


@pytest.mark.parametrize("in_process", [False, True], ids=["core-process", "in-process"])
def test_chat_template_override(tiny_model, tmp_path, in_process):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template("no-such-file.jinja")
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128),
                                    in_process=in_process)
    assert (llm.engine is not None) == in_process
    messages = [{"role": "user", "content": "Hello"}]

    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/tokenize", json={"messages": messages})
        expected = apply_chat_template(llm.get_tokenizer(), messages, chat_template=TEMPLATE)
        assert r.json()["tokens"] == expected
        # With special tokens (none: the tests' tokenizer has no post-processor); this was a
        # 500 with transformers 5's fast tokenizers (no build_inputs_with_special_tokens).
        r = await client.post("/tokenize", json={"messages": messages, "add_special_tokens": True})
        assert r.status_code == 200 and r.json()["tokens"] == expected, r.text
        r = await client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] == len(expected)
        models = (await client.get("/v1/models")).json()["data"]
        assert models[0]["id"] == tiny_model  # no --served-model-name: the model argument

    _run(llm, ServerArgs(chat_template=str(path)), scenario)


PARTS_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]"
                  "{% for part in m['content'] %} <{{ part['text'] }}>{% endfor %}"
                  "{{ '\\n' }}{% endfor %}")


@pytest.mark.parametrize("content_format", ["auto", "openai", "string"])
def test_chat_template_content_format(tiny_model, content_format):
    """--chat-template-content-format: content parts reach a template that loops over them
    as parts (auto finds the loop), or joined into a string (one 'part' per character)."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=256),
                                    in_process=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "you"}]}]
    tok = llm.get_tokenizer()
    kept = tok.encode("[user] <Hi> <you>\n", add_special_tokens=False)

    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/tokenize", json={"messages": messages})
        assert r.status_code == 200, r.text
        assert (r.json()["tokens"] == kept) == (content_format != "string")
        r = await client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        assert (r.json()["usage"]["prompt_tokens"] == len(kept)) == (content_format != "string")

    _run(llm, ServerArgs(chat_template=PARTS_TEMPLATE,
                         chat_template_content_format=content_format), scenario)


@pytest.mark.parametrize("log_requests", [True, False])
def test_response_role_and_request_log_switch(tiny_model, caplog, log_requests):
    """--response-role names the reply after a generation prompt (else the reply continues
    the last message's role, as vLLM's); --disable-log-requests drops the per-request line."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128))
    messages = [{"role": "user", "content": "Hello"}]

    async def scenario(client: httpx.AsyncClient) -> None:
        body = {"messages": messages, "max_tokens": 3, "temperature": 0}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.json()["choices"][0]["message"]["role"] == "bot"
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        first = json.loads(r.text.split("data: ")[1])
        assert first["choices"][0]["delta"]["role"] == "bot"
        r = await client.post("/v1/chat/completions",
                              json={**body, "add_generation_prompt": False})
        assert r.json()["choices"][0]["message"]["role"] == "user"

    with caplog.at_level(logging.INFO, logger="kvflow.entrypoints.openai"):
        _run(llm, ServerArgs(response_role="bot", disable_log_requests=not log_requests),
             scenario)
    finished = [r for r in caplog.records if " finished (" in r.getMessage()]
    assert len(finished) == (3 if log_requests else 0)


def test_server_default_for_tokens_as_ids(tiny_model):
    """--return-tokens-as-token-ids: logprob tokens read "token_id:N" unless a request
    says otherwise."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128))

    async def scenario(client: httpx.AsyncClient) -> None:
        body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 1}
        r = await client.post("/v1/completions", json=body)
        lp = r.json()["choices"][0]["logprobs"]
        assert all(t.startswith("token_id:") for t in lp["tokens"]) and len(lp["tokens"]) == 3
        r = await client.post("/v1/completions",
                              json={**body, "return_tokens_as_token_ids": False})
        assert not any(t.startswith("token_id:") for t in r.json()["choices"][0]["logprobs"]["tokens"])
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0,
            "logprobs": True})
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert all(c["token"].startswith("token_id:") for c in content)

    _run(llm, ServerArgs(return_tokens_as_token_ids=True), scenario)


def test_requests_take_the_models_sampling_defaults(tiny_model, tmp_path):
    """--generation-config auto (the default): a request that leaves temperature unset samples
    with the model's (here 0: greedy); a request's own value wins; 'vllm' ignores the file."""
    import shutil

    from kvflow import LLM, SamplingParams

    path = str(tmp_path / "m")
    shutil.copytree(tiny_model, path)
    gen_path = tmp_path / "m" / "generation_config.json"
    config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen_path.write_text(json.dumps({**config, "temperature": 0.0}))
    offline = LLM(path, max_model_len=128, generation_config="vllm")
    greedy = offline.generate("Hello", SamplingParams(temperature=0, max_tokens=6),
                              use_tqdm=False)[0].outputs[0].text
    seeded = offline.generate("Hello", SamplingParams(seed=3, max_tokens=6),
                              use_tqdm=False)[0].outputs[0].text
    del offline
    assert greedy != seeded  # else the test could not tell the defaults apart
    body = {"prompt": "Hello", "max_tokens": 6, "seed": 3}

    for source, expected in (("auto", greedy), ("vllm", seeded)):
        llm = AsyncLLM.from_engine_args(EngineArgs(model=path, max_model_len=128,
                                                   generation_config=source))

        async def scenario(client: httpx.AsyncClient, expected=expected) -> None:
            r = await client.post("/v1/completions", json=body)
            assert r.json()["choices"][0]["text"] == expected
            r = await client.post("/v1/completions", json={**body, "temperature": 1.0})
            assert r.json()["choices"][0]["text"] == seeded  # the request's own value wins

        _run(llm, ServerArgs(), scenario)


@pytest.mark.parametrize("field,value", [("guided_json", {"type": "object"}),
                                         ("guided_choice", ["yes", "no"]),
                                         ("guided_regex", "[0-9]+")])
def test_guided_decoding_fields_are_refused_not_ignored(tiny_model, field, value):
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128))

    async def scenario(client: httpx.AsyncClient) -> None:
        for route, body in (("/v1/completions", {"prompt": "Hi"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                    "content": "Hi"}]})):
            r = await client.post(route, json={**body, "max_tokens": 2, field: value})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == field
            assert "guided decoding" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2,
                                                        field: None})
        assert r.status_code == 200  # null is absent

    _run(llm, ServerArgs(), scenario)


@pytest.mark.parametrize("in_process", [False, True], ids=["core-process", "in-process"])
def test_profile_routes(tiny_model, tmp_path, monkeypatch, in_process):
    """vLLM's /start_profile and /stop_profile, present only with a trace folder."""
    import time

    monkeypatch.setenv("KVFLOW_TORCH_PROFILER_DIR", str(tmp_path))
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128),
                                    in_process=in_process)

    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.post("/start_profile")).status_code == 200
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200
        assert (await client.post("/stop_profile")).status_code == 200
        deadline = time.monotonic() + 30  # the core process applies it before its next turn
        while not list(tmp_path.glob("rank0.*.pt.trace.json.gz")):
            assert time.monotonic() < deadline, "no trace written"
            await asyncio.sleep(0.1)
        if in_process:  # the engine's refusal comes back (the core process logs it instead)
            r = await client.post("/stop_profile")
            assert r.status_code == 400 and "not running" in r.json()["error"]["message"]

    _run(llm, ServerArgs(), scenario)


def test_no_profile_routes_without_a_trace_folder(tiny_model, monkeypatch):
    monkeypatch.delenv("KVFLOW_TORCH_PROFILER_DIR", raising=False)
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128),
                                    in_process=True)

    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.post("/start_profile")).status_code == 404

    _run(llm, ServerArgs(), scenario)


@pytest.mark.parametrize("in_process", [False, True], ids=["core-process", "in-process"])
def test_completions_beam_search_equals_offline(tiny_model, in_process):
    """vLLM's use_beam_search on /v1/completions: the n best beams of each prompt, the same
    as LLM.beam_search's (beams of one round run as concurrent requests)."""
    from kvflow import LLM
    from kvflow.sampling_params import BeamSearchParams

    prompts = [[1, 17, 33, 60, 7], [1, 90, 4]]
    offline = LLM(tiny_model, max_model_len=128)
    expected = offline.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=4,
                                                             ignore_eos=True,
                                                             length_penalty=0.5))
    del offline
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=128),
                                    in_process=in_process)

    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/completions", json={
            "prompt": prompts, "use_beam_search": True, "n": 3, "max_tokens": 4,
            "ignore_eos": True, "length_penalty": 0.5})
        assert r.status_code == 200, r.text
        body = r.json()
        texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
        assert texts == [seq.text for out in expected for seq in out.sequences]
        assert body["usage"]["completion_tokens"] == 2 * 3 * 4
        assert all(c["finish_reason"] == "length" for c in body["choices"])

    _run(llm, ServerArgs(), scenario)
