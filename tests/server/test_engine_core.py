"""The engine core process behind ``AsyncLLM``: what crosses its pipes, and its death.

The rest of the server suite already runs through it (``kvflow serve`` uses it
by default); these tests aim at what only it can get wrong: errors and aborts
across the process boundary, a core that dies under load, and no core left
behind by a server that exits or is killed. One engine core (``core_llm``)
serves the module; the test that kills it runs last.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe

import httpx
import pytest
from conftest import ServerProcess, engine_core_pids, is_running

from kvflow.config import EngineArgs
from kvflow.engine.async_llm import AsyncLLM, EngineDeadError
from kvflow.engine.core_messages import (
    AbortRequests,
    CoreOutputs,
    OutputDecoder,
    OutputEncoder,
    Shutdown,
)
from kvflow.engine.core_proc import EngineCoreLoop
from kvflow.engine.engine_core import AddRequest, EngineCore
from kvflow.engine.llm_engine import LLMEngine
from kvflow.engine.mp_client import MPCoreClient
from kvflow.engine.output_processor import RequestOutputKind
from kvflow.entrypoints.openai.server import ServerArgs, build_app
from kvflow.sampling_params import SamplingParams

MAX_MODEL_LEN = 256
DELTA = RequestOutputKind.DELTA


@pytest.fixture(scope="module")
def core_llm(tiny_model):
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model, max_model_len=MAX_MODEL_LEN))
    assert isinstance(llm.client, MPCoreClient) and llm.engine is None
    yield llm
    asyncio.run(llm.shutdown())
    assert not is_running(llm.client.proc.pid)


async def _tokens(llm: AsyncLLM, prompt: str, request_id: str, max_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens: list[int] = []
    async for out in llm.generate(prompt, params, request_id, output_kind=DELTA):
        tokens += out.outputs[0].token_ids
    assert out.finished and out.outputs[0].finish_reason == "length"
    return tokens


async def _wait_stats(llm: AsyncLLM, check, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check(llm.get_stats()):
        assert time.monotonic() < end, llm.get_stats()
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------- through the pipes
def test_bad_input_is_the_engines_value_error(core_llm):
    """The engine's ValueError comes back whole, before any output, and queues nothing."""

    async def run() -> None:
        with pytest.raises(ValueError) as info:
            async for _ in core_llm.generate("hi", SamplingParams(logprobs=25), "req-1"):
                raise AssertionError("a rejected request produced an output")
        assert str(info.value) == ("logprobs=25 exceeds max_logprobs=20; raise the engine "
                                   "option max_logprobs.")
        # Nothing was queued, and the id is free again.
        assert len(await _tokens(core_llm, "hi", "req-1", 3)) == 3
        await _wait_stats(core_llm, lambda s: s.num_running == 0 and s.num_waiting == 0)

    asyncio.run(run())


def test_abort_frees_the_cores_blocks(core_llm):
    async def run() -> None:
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        stream = core_llm.generate("A long story:", params, "long", output_kind=DELTA)
        await stream.__anext__()
        await stream.__anext__()
        stats = core_llm.get_stats()  # the core's own, as of the step that sent that output
        assert stats.num_running == 1 and stats.kv_cache_usage > 0
        await stream.aclose()
        await _wait_stats(core_llm, lambda s: (s.num_running, s.num_waiting,
                                               s.kv_cache_usage) == (0, 0, 0))

    asyncio.run(run())


def test_many_concurrent_streams(core_llm):
    """64 streams at once: each gets exactly its tokens; identical prompts, identical tokens."""

    async def run() -> None:
        alone = await _tokens(core_llm, "The quick brown fox", "alone", 12)
        results = await asyncio.wait_for(asyncio.gather(*(
            _tokens(core_llm, "The quick brown fox" if i % 2 else f"Stream {i}", f"s{i}", 12)
            for i in range(64))), timeout=60)
        assert all(len(r) == 12 for r in results)
        assert all(r == alone for r in results[1::2])

    asyncio.run(run())


# ---------------------------------------------------------------------------- the loop itself
@pytest.fixture(scope="module")
def engine(tiny_model):
    """An engine in this process, for the parts of the core that need no process."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_model, max_model_len=64))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_output_codec_round_trip(engine, kind):
    """Decoded outputs equal the engine's; a request's prompt crosses once."""
    encoder, decoder = OutputEncoder(), OutputDecoder()
    params = SamplingParams(n=2, max_tokens=5, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    engine.add_request("r", "Hello there", params, output_kind=kind)
    engine.add_request("gone", "Hello", SamplingParams(max_tokens=50), output_kind=kind)
    wires = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if any(o.request_id == "gone" for o in outputs):
            outputs += engine.abort_request("gone")
        for out in outputs:
            wire = pickle.loads(pickle.dumps(encoder.encode(out)))
            assert decoder.decode(wire) == out  # metrics too: the decoder's are live
            wires.append(wire)
    for request_id in ("r", "gone"):
        firsts = [w[1] for w in wires if w[0] == request_id]
        assert firsts[0] is not None and firsts[1:] == [None] * (len(firsts) - 1)
    assert encoder._num_times_sent == {} and decoder._requests == {}


def test_core_loop_contract(engine):
    """Run in a thread of this process: rejection before output, a failing step fails only
    the requests it held and the loop goes on, Shutdown sends the turn's outputs first."""
    to_core, core_input = Pipe(duplex=False)
    core_output, from_core = Pipe(duplex=False)
    loop = EngineCoreLoop(EngineCore(engine), to_core, from_core)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    real_step = engine.step

    def add(rid: str, p: SamplingParams = params) -> None:
        core_input.send(AddRequest(rid, "hi", p, None, DELTA))

    decoder = OutputDecoder()

    def next_turn() -> CoreOutputs:
        assert core_output.poll(10)
        turn = core_output.recv()
        turn.outputs = [decoder.decode(wire) for wire in turn.outputs]
        return turn

    def until(done) -> list[CoreOutputs]:
        turns = [next_turn()]
        while not done(turns):
            turns.append(next_turn())
        return turns

    def finished(turns: list[CoreOutputs], rid: str) -> bool:
        return any(o.request_id == rid and o.finished for t in turns for o in t.outputs)

    try:
        add("bad", SamplingParams(logprobs=25))
        turn = next_turn()
        assert turn.outputs == [] and turn.failures["bad"].is_bad_input
        assert turn.failures["bad"].to_exception().args[0].startswith("logprobs=25 exceeds")

        engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore
        add("a")
        add("b")
        failed: dict = {}
        while len(failed) < 2:  # one failing step, or two if "b" came after it
            failed.update(next_turn().failures)
        assert set(failed) == {"a", "b"} and not failed["a"].is_bad_input
        assert failed["a"].message == "engine step failed: RuntimeError: boom"
        engine.step = real_step  # type: ignore[method-assign]
        add("c")
        turns = until(lambda t: finished(t, "c"))
        assert sum(len(o.outputs[0].token_ids) for t in turns for o in t.outputs) == 4
        assert turns[-1].stats.num_running == 0 and turns[-1].stats.kv_cache_usage == 0

        add("d", SamplingParams(max_tokens=50, ignore_eos=True))
        core_input.send(AbortRequests(["d"]))
        core_input.send(Shutdown())
        turns = until(lambda t: finished(t, "d"))
        assert turns[-1].outputs[-1].outputs[0].finish_reason == "abort"
        assert turns[-1].stats.kv_cache_usage == 0
        thread.join(10)
        assert not thread.is_alive()
    finally:
        engine.step = real_step  # type: ignore[method-assign]
        core_input.close()  # a loop still running sees EOF and returns
        thread.join(10)


def test_startup_failure_raises_in_the_parent(tiny_model):
    """The engine's own start-up ValueError (here: a KV cache too small for one request)."""
    args = EngineArgs(model=tiny_model, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=2)
    with pytest.raises(ValueError, match="The KV cache holds 2 blocks x 16 tokens"):
        AsyncLLM.from_engine_args(args)


# ---------------------------------------------------------------------------- death and exit
def test_exit_without_shutdown_stops_the_core(tiny_model):
    """A program that never calls shutdown() still exits at once, its core with it."""
    script = ("import sys; from kvflow.config import EngineArgs; "
              "from kvflow.engine.async_llm import AsyncLLM; "
              f"llm = AsyncLLM.from_engine_args(EngineArgs(model={tiny_model!r})); "
              "print(llm.client.proc.pid, flush=True)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert not is_running(int(r.stdout)) and "ERROR" not in r.stderr, r.stderr


def test_server_killed_leaves_no_engine_core(tiny_model):
    """A server that dies without a word (SIGKILL): its engine core sees the pipe close
    and exits on its own."""
    server = ServerProcess(tiny_model, "--max-model-len", str(MAX_MODEL_LEN))
    try:
        (core_pid,) = engine_core_pids(server.proc.pid)
        server.proc.kill()
        server.proc.wait(10)
        end = time.monotonic() + 30
        while is_running(core_pid):
            assert time.monotonic() < end, "the engine core outlived its server"
            time.sleep(0.1)
    finally:
        server.close()


def test_killed_core_fails_in_flight_requests_and_503s_new_ones(core_llm):
    """Runs last: it kills the module's engine core."""
    app = build_app(core_llm, ServerArgs(served_model_names=["m"]))
    body = {"prompt": "A long story:", "max_tokens": 240, "ignore_eos": True}

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app",
                                     timeout=30) as client:
            tokens_before = core_llm.get_stats().generation_tokens_total
            stream = asyncio.ensure_future(client.post("/v1/completions",
                                                       json={**body, "stream": True}))
            whole = asyncio.ensure_future(client.post("/v1/completions", json=body))
            # Both run, and the stream has had outputs (its 200 went out): the stats come
            # in the message that carries the outputs of the tokens they count.
            await _wait_stats(core_llm, lambda s: s.num_running == 2 and
                              s.generation_tokens_total >= tokens_before + 8)
            # Stopped, the core sends nothing more; once the reader has the last of what it
            # sent, the stats say for sure that both requests are still running.
            pid = core_llm.client.proc.pid
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.3)
            assert core_llm.get_stats().num_running == 2
            os.kill(pid, signal.SIGKILL)

            events = [line[6:] for line in (await stream).text.splitlines()
                      if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == 503 and "killed by signal SIGKILL" in error["message"]
            r = await whole
            assert r.status_code == 503
            assert "killed by signal SIGKILL" in r.json()["error"]["message"]

            t0 = time.monotonic()
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "ServiceUnavailableError"
            assert "Restart it" in r.json()["error"]["message"]
            assert (await client.get("/health")).status_code == 503
            assert (await client.get("/metrics")).status_code == 200
            assert time.monotonic() - t0 < 5
        with pytest.raises(EngineDeadError):
            async for _ in core_llm.generate("hi", None, "after"):
                pass

    asyncio.run(run())
