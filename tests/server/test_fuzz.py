"""Fuzzing the server: no input may get a 5xx or leave a traceback in the log.

Two fuzzers: schemathesis over the server's own OpenAPI document (when it is
installed), and a hand-written one that throws odd JSON values at every field
of the two generation routes (always).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ServerProcess, metric, metrics_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

MAX_MODEL_LEN = 64
"""Small, so that any valid request the fuzzers make finishes quickly."""


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerProcess(tiny_model, "--max-model-len", str(MAX_MODEL_LEN))
    yield srv
    log = srv.log()
    srv.close()
    assert "Traceback" not in log, log


def test_schemathesis_finds_no_server_error(server):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "--checks", "not_a_server_error", "--max-time", "40", "--request-timeout", "30",
           "--seed", "0", "--workers", "1", "--suppress-health-check", "all",
           "--mode", "all"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=_tmp_dir())
    out = r.stdout + r.stderr
    assert "Server error" not in out and "not_a_server_error" not in out.split("SUMMARY")[-1], out
    assert r.returncode == 0 or "Failures" not in out.split("SUMMARY")[-1], out
    assert "generated" in out  # it did run test cases
    _assert_idle(server)


def _tmp_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="schemathesis-")


# ---------------------------------------------------------------------------- hand-written fuzz
_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 16, 128, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1e-9, 1e308]),
    st.text(max_size=20), st.sampled_from(["", "hi", ".", "\x00", "\ud7ff"]),
    st.lists(st.integers(min_value=-5, max_value=1000), max_size=5),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(min_value=-200, max_value=200),
                    max_size=3),
)
_MESSAGES = st.one_of(
    _ODD,
    st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"])},
        optional={"content": st.one_of(st.text(max_size=20), _ODD,
                                       st.lists(st.fixed_dictionaries(
                                           {"type": st.sampled_from(["text", "image_url"]),
                                            "text": st.text(max_size=5)}), max_size=2))}),
        max_size=3),
)


_COMPLETION_FIELDS = [f for f in CompletionRequest.model_fields if f not in ("prompt", "stream")]
_CHAT_FIELDS = [f for f in ChatCompletionRequest.model_fields if f not in ("messages", "stream")]
_VALID_MESSAGES = [[{"role": "user", "content": "hi"}],
                   [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]]


@st.composite
def _requests(draw) -> tuple[str, dict]:
    """A mostly valid body with up to two fields set to odd values.

    Setting every field at random would make nearly every request a 400 at the
    first check; a few odd fields on a sound body reach the deeper paths too.
    """
    sound = draw(st.integers(0, 3)) > 0  # three bodies in four start valid
    if draw(st.booleans()):
        path, fields = "/v1/completions", _COMPLETION_FIELDS
        prompt = (st.one_of(st.text(min_size=1, max_size=30),
                            st.lists(st.integers(0, 400), min_size=1, max_size=8))
                  if sound else _ODD)
        body = {"prompt": draw(prompt), "max_tokens": 4}
    else:
        path, fields = "/v1/chat/completions", _CHAT_FIELDS
        messages = st.sampled_from(_VALID_MESSAGES) if sound else _MESSAGES
        body = {"messages": draw(messages), "max_tokens": 4}
    for name in draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)):
        body[name] = draw(_ODD)
    if draw(st.booleans()):
        body["stream"] = True
    return path, body


def test_handwritten_fuzz_never_5xx(server):
    client = httpx.Client(base_url=server.url, timeout=60)
    seen: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_requests())
    def check(request: tuple[str, dict]) -> None:
        path, body = request
        r = client.post(path, content=json.dumps(body, allow_nan=False).encode(),
                        headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code != 200:
            err = r.json()["error"]
            assert err["code"] == r.status_code and err["message"], err
        elif body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]

    check()
    assert seen.get(200, 0) >= 25 and sum(v for k, v in seen.items() if 400 <= k < 500) > 0, seen
    client.close()
    _assert_idle(server)


def _assert_idle(server: ServerProcess, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while True:
        values = metrics_values(server.url)
        if (metric(values, "kvflow:num_requests_running") == 0
                and metric(values, "kvflow:kv_cache_usage_perc") == 0):
            return
        assert time.monotonic() < end, values
        time.sleep(0.2)

