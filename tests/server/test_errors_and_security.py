"""Bad input, the API key, the body size limit and SIGTERM, against one server process.

The server runs with ``KVFLOW_API_KEY`` set (the environment twin of
``--api-key``) and a small body limit. Every bad request must get a 4xx in
OpenAI's error shape, and leave the engine serving with no KV block held.
The SIGTERM test stops the server, so it runs last.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Optional

import httpx
import openai
import pytest
from conftest import ServerProcess, engine_core_pids, is_running, metric, metrics_values

KEY = "sk-kvflow-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 512
BODY_LIMIT = 20_000
USER = [{"role": "user", "content": "hi"}]
_ANY = object()


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerProcess(tiny_model, "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-request-body-bytes", str(BODY_LIMIT),
                        env={"KVFLOW_API_KEY": KEY})
    yield srv
    log = srv.log()
    srv.close()
    assert "Traceback" not in log, log


def assert_error(resp: httpx.Response, status: int, param: Any = _ANY) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["type"] and err["message"]
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]
    if param is not _ANY:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------- bad input
COMPLETION_CASES: list[tuple[str, Any, int, Any]] = [
    # (id, body: dict or raw bytes, status, param)
    ("malformed-json", b'{"prompt": "hi",', 400, None),
    ("body-is-list", b"[]", 400, None),
    ("body-is-string", b'"hello"', 400, None),
    ("empty-body", b"", 400, None),
    ("nan", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("infinity", b'{"prompt": "hi", "top_p": 1e999}', 400, "top_p"),
    ("missing-prompt", {}, 400, "prompt"),
    ("prompt-wrong-type", {"prompt": {"a": 1}}, 400, "prompt"),
    ("prompt-empty-string", {"prompt": ""}, 400, "prompt"),
    ("prompt-empty-list", {"prompt": []}, 400, "prompt"),
    ("prompt-id-out-of-vocab", {"prompt": [10**6]}, 400, "prompt"),
    ("prompt-id-negative", {"prompt": [5, -1]}, 400, "prompt"),
    ("temperature-type", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("temperature-negative", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("top-p-range", {"prompt": "hi", "top_p": 5}, 400, "top_p"),
    ("top-k-range", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("top-k-huge", {"prompt": "hi", "top_k": 10**20}, 400, "top_k"),
    ("min-p-range", {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("n-zero", {"prompt": "hi", "n": 0}, 400, "n"),
    ("n-huge", {"prompt": "hi", "n": 100000}, 400, "n"),
    ("max-tokens-zero", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-type", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("max-tokens-over-context", {"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ("min-tokens-over-max", {"prompt": "hi", "max_tokens": 5, "min_tokens": 20}, 400,
     "min_tokens"),
    ("logprobs-over-max", {"prompt": "hi", "logprobs": 100}, 400, "logprobs"),
    ("logprobs-negative", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("seed-past-int64", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("presence-penalty", {"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty"),
    ("repetition-penalty", {"prompt": "hi", "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("stop-empty-string", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("stop-wrong-type", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("stop-token-out-of-vocab", {"prompt": "hi", "stop_token_ids": [10**6]}, 400,
     "stop_token_ids"),
    ("logit-bias-key", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit-bias-token", {"prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("logit-bias-value", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("allowed-token-ids", {"prompt": "hi", "allowed_token_ids": [10**6]}, 400,
     "allowed_token_ids"),
    ("best-of", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("truncate-zero", {"prompt": "hi", "truncate_prompt_tokens": 0}, 400,
     "truncate_prompt_tokens"),
    ("stream-options-without-stream", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("suffix", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("response-format", {"prompt": "hi", "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("prompt-logprobs-stream", {"prompt": "hi", "stream": True, "prompt_logprobs": 1}, 400,
     "prompt_logprobs"),
    ("unknown-model", {"prompt": "hi", "model": "gpt-17"}, 404, "model"),
    ("beam-search-stream", {"prompt": "hi", "use_beam_search": True, "n": 2, "stream": True},
     400, "stream"),
    ("beam-search-logprobs", {"prompt": "hi", "use_beam_search": True, "logprobs": 2}, 400,
     "logprobs"),
    ("stream-bad-input", {"prompt": "hi", "stream": True, "logprobs": 100}, 400, "logprobs"),
]

CHAT_CASES: list[tuple[str, Any, int, Any]] = [
    ("no-messages", {"messages": []}, 400, "messages"),
    ("beam-search-chat", {"messages": USER, "use_beam_search": True}, 400, "use_beam_search"),
    ("messages-not-list", {"messages": "hi"}, 400, "messages"),
    ("message-without-role", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("content-wrong-type", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("image-part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
     "messages[0].content"),
    ("tools-auto", {"messages": USER, "tools": [{"type": "function",
                                                 "function": {"name": "f"}}]}, 400,
     "tool_choice"),
    ("top-logprobs-without-logprobs", {"messages": USER, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("top-logprobs-range", {"messages": USER, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("request-chat-template", {"messages": USER, "chat_template": "{{ 1 }}"}, 400,
     "chat_template"),
    ("template-kwargs-clash", {"messages": USER, "chat_template_kwargs": {"tokenize": True}},
     400, "chat_template_kwargs"),
    ("max-completion-tokens-over-context", {"messages": USER,
                                            "max_completion_tokens": 10_000}, 400,
     "max_completion_tokens"),
    ("max-tokens-over-context", {"messages": USER, "max_tokens": 10_000}, 400, "max_tokens"),
    ("continue-and-generation-prompt", {"messages": USER, "continue_final_message": True},
     400, "continue_final_message"),
    ("unknown-model", {"messages": USER, "model": "nope"}, 404, "model"),
]


def _post(server: ServerProcess, path: str, body: Any, **headers: str) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body,
                          headers={"content-type": "application/json", **AUTH, **headers})
    return httpx.post(server.url + path, json=body, headers={**AUTH, **headers})


@pytest.mark.parametrize("case", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_bad_completion_requests(server, case):
    _, body, status, param = case
    assert_error(_post(server, "/v1/completions", body), status, param)


@pytest.mark.parametrize("case", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_requests(server, case):
    _, body, status, param = case
    assert_error(_post(server, "/v1/chat/completions", body), status, param)


def test_prompt_over_context_names_both_numbers(server):
    err = assert_error(_post(server, "/v1/completions", {"prompt": "hello " * 600}), 400)
    num_tokens = httpx.post(server.url + "/tokenize", json={"prompt": "hello " * 600},
                            headers=AUTH).json()["count"]
    assert str(MAX_MODEL_LEN) in err["message"] and str(num_tokens) in err["message"]
    err = assert_error(_post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 600}),
                       400)
    assert str(MAX_MODEL_LEN) in err["message"] and "600" in err["message"]


def test_wrong_content_type_method_and_route(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi"}',
                   headers={"content-type": "text/plain", **AUTH})
    assert "application/json" in assert_error(r, 400)["message"]
    assert_error(httpx.get(server.url + "/v1/completions", headers=AUTH), 405)
    assert_error(httpx.post(server.url + "/v1/nothing", json={}, headers=AUTH), 404)
    assert_error(httpx.get(server.url + "/v1/models/nope", headers=AUTH), 404)


def test_bad_tokenize_requests(server):
    assert_error(_post(server, "/tokenize", {}), 400, "prompt")
    assert_error(_post(server, "/tokenize", {"prompt": "a", "messages": USER}), 400)
    assert_error(_post(server, "/tokenize", {"prompt": "a", "model": "nope"}), 404, "model")
    assert_error(_post(server, "/detokenize", {"tokens": [10**6]}), 400, "tokens")
    assert_error(_post(server, "/detokenize", {"tokens": "abc"}), 400, "tokens")


def test_body_size_limit(server):
    big = {"prompt": "x" * (BODY_LIMIT + 10)}
    err = assert_error(_post(server, "/v1/completions", big), 413)
    assert str(BODY_LIMIT) in err["message"]

    def chunks():  # no Content-Length: the limit applies to what arrives
        for _ in range(30):
            yield b" " * 1000

    r = httpx.post(server.url + "/v1/completions", content=chunks(),
                   headers={"content-type": "application/json", **AUTH})
    assert_error(r, 413)


def test_openai_client_raises_typed_errors(server):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="", prompt="hi", temperature=-3)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="", prompt="hi", stream=True, max_tokens=10_000)


def test_engine_unharmed_after_bad_input(server):
    """Nothing above left a request running or a KV block held, and serving goes on."""
    values = metrics_values(server.url)
    assert metric(values, "kvflow:num_requests_running") == 0
    assert metric(values, "kvflow:num_requests_waiting") == 0
    assert metric(values, "kvflow:kv_cache_usage_perc") == 0
    r = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------- API key
def test_api_key_guards_api_routes(server):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                         ("GET", "/openapi.json")):
        r = httpx.request(method, server.url + path, json={"prompt": "hi"})
        assert_error(r, 401)
        r = httpx.request(method, server.url + path, json={"prompt": "hi"},
                          headers={"Authorization": "Bearer wrong-key"})
        assert_error(r, 401)
    assert httpx.get(server.base_url + "/models", headers=AUTH).status_code == 200
    for path in ("/health", "/ping", "/version", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200, path
    preflight = httpx.options(server.base_url + "/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200


def test_api_key_with_openai_client(server):
    good = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert good.completions.create(model="", prompt="hi", max_tokens=2).usage
    bad = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---------------------------------------------------------------------------- SIGTERM (last)
def test_sigterm_aborts_in_flight_and_exits_zero(server):
    """In-flight requests end (finish_reason "abort"), the process exits 0 promptly, and
    its engine core process is gone with it."""
    results: dict[str, Any] = {}
    started = threading.Barrier(4)

    def stream(i: int) -> None:
        body = {"prompt": f"stream {i}", "max_tokens": 480, "ignore_eos": True,
                "stream": True}
        events = []
        with httpx.stream("POST", server.base_url + "/completions", json=body, headers=AUTH,
                          timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        started.wait(30)
        results[f"stream{i}"] = events

    def whole() -> None:
        # 32 samples make every step slower, so nothing finishes before the signal.
        body = {"prompt": "whole", "max_tokens": 480, "ignore_eos": True, "n": 32,
                "temperature": 1.0}
        results["whole"] = httpx.post(server.base_url + "/completions", json=body,
                                      headers=AUTH, timeout=60)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=whole))
    for t in threads:
        t.start()
    started.wait(30)  # three streams are under way (and the whole request was sent)
    _wait_running(server, 4)
    (core_pid,) = engine_core_pids(server.proc.pid)
    t0 = time.monotonic()
    rc = server.stop(timeout=30)
    for t in threads:
        t.join(30)
    assert rc == 0, server.log()
    assert time.monotonic() - t0 < 20
    assert not is_running(core_pid)
    for i in range(3):
        events = results[f"stream{i}"]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    whole_resp = results["whole"]
    assert whole_resp.status_code == 200
    whole_body = whole_resp.json()
    assert all(c["finish_reason"] == "abort" for c in whole_body["choices"])
    assert whole_body["usage"]["completion_tokens"] < 480 * 32


def _wait_running(server: ServerProcess, count: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    running: Optional[float] = None
    while time.monotonic() < end:
        running = metric(metrics_values(server.url), "kvflow:num_requests_running")
        if running >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"only {running} requests running")
