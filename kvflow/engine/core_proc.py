"""The engine core process: the engine stepping in a process of its own.

The API server's event loop (HTTP, JSON, SSE) and the engine's Python
(scheduling, batch building, output processing) would otherwise share one
GIL, and every add or abort would wait for the step in flight. Here the
engine runs in a spawned child (spawned, not forked: a fork would copy CUDA
state), and the two sides talk over two one-way pipes of pickled messages
(core_messages.py)::

    API process (mp_client.MPCoreClient)              engine core (EngineCoreLoop)
    ──────────────────────────────────────            ────────────────────────────
    writer thread ── input pipe ─────────────────────► drain every waiting message
      AddRequest | AbortRequests | Shutdown               (blocks only when idle)
                                                        step() if any request is left
    reader thread ◄─ output pipe ─────────────────────  one CoreOutputs per loop turn:
      routes outputs to the request streams               outputs, failures, stats

Contract of the loop:

- A request that ``add_request`` rejects never runs; its ``ValueError`` text
  comes back as a ``RequestFailure(is_bad_input=True)`` in the turn's
  ``failures``, before any output of it could exist.
- A step that raises fails every request in the engine (aborted, one
  failure each) and the loop goes on with the next message.
- Every turn that changed anything sends one ``CoreOutputs`` carrying the
  engine's stats after it, so the API process's copy of the stats is the
  engine's own whenever the core is idle (blocked on its input).
- ``Shutdown`` ends the loop after the turn's outputs are sent; a closed
  pipe (the API process died) ends it at once. Either way the engine and
  its workers are shut down and the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any, Optional

import torch

from kvflow.config import EngineConfig
from kvflow.distributed.utils import available_cpus
from kvflow.engine.core_messages import (
    AbortRequests,
    CoreOutputs,
    CoreReady,
    CoreRequest,
    OutputEncoder,
    ProfileControl,
    Shutdown,
    StartupFailed,
    WireOutput,
)
from kvflow.engine.engine_core import AddRequest, EngineCore, RequestFailure
from kvflow.engine.llm_engine import EngineStats, LLMEngine
from kvflow.gc_freeze import freeze_startup_heap

logger = logging.getLogger("kvflow.engine")


# ---------------------------------------------------------------------------- loop
class EngineCoreLoop:
    """Drives one ``EngineCore`` from the input pipe and answers on the output pipe."""

    def __init__(self, core: EngineCore, input_conn: Connection, output_conn: Connection) -> None:
        self.core = core
        self.input_conn = input_conn
        self.output_conn = output_conn
        self.encoder = OutputEncoder()
        self._last_stats: Optional[EngineStats] = None

    def run(self) -> None:
        """Returns after ``Shutdown``, or when the API process is gone (a pipe closed)."""
        while True:
            messages, is_closed = self._receive(block=not self.core.has_unfinished_requests())
            outputs: list[WireOutput] = []
            failures: dict[str, RequestFailure] = {}
            stop = self._handle(messages, outputs, failures)
            if not stop and not is_closed and self.core.has_unfinished_requests():
                step_outputs, step_failures = self.core.step()
                outputs.extend(map(self.encoder.encode, step_outputs))
                failures.update(step_failures)
            stats = self.core.get_stats()
            # A step that only advanced a prefill chunk still tells of its stats change;
            # a step that changed nothing (nothing could be scheduled) sends nothing.
            if messages or outputs or failures or stats != self._last_stats:
                try:
                    self.output_conn.send(CoreOutputs(outputs, failures, stats))
                except OSError:
                    is_closed = True
                self._last_stats = stats
            if is_closed and not stop:
                logger.warning("the API process is gone; the engine core exits")
            if stop or is_closed:
                return

    def _handle(self, messages: list[CoreRequest], outputs: list[WireOutput],
                failures: dict[str, RequestFailure]) -> bool:
        """Applies the messages in order, up to a Shutdown; True if there was one."""
        for msg in messages:
            if isinstance(msg, Shutdown):
                return True
            if isinstance(msg, AddRequest):
                failure = self.core.add_request(msg)
                if failure is not None:
                    failures[msg.request_id] = failure
            elif isinstance(msg, AbortRequests):
                outputs.extend(map(self.encoder.encode,
                                   self.core.abort_requests(msg.request_ids)))
            elif isinstance(msg, ProfileControl):
                try:
                    self.core.profile(msg.start)
                except RuntimeError as exc:  # not configured, or already in that state
                    logger.warning("profiler: %s", exc)
            else:
                raise AssertionError(f"unknown engine core message {msg!r}")
        return False

    def _receive(self, block: bool) -> tuple[list[CoreRequest], bool]:
        """Every message waiting on the pipe (waits for one only if ``block``), and whether
        the pipe was closed after them (the messages still count: Shutdown may be one)."""
        messages: list[CoreRequest] = []
        try:
            if block:
                messages.append(self.input_conn.recv())
            while self.input_conn.poll():
                messages.append(self.input_conn.recv())
        except (EOFError, OSError):
            return messages, True
        return messages, False


# ---------------------------------------------------------------------------- process entry
def run_engine_core(config: EngineConfig, input_conn: Connection,
                    output_conn: Connection) -> None:
    """Body of the engine core process (the ``multiprocessing`` spawn target)."""
    # Ctrl-C reaches the whole process group; the API process decides what it means
    # (abort what is in flight, then send Shutdown).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.device_config.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The model's CPU kernels would take every core, and the API process needs one:
        # oversubscribed, each parallel region waits for a descheduled thread. On 2 cores
        # (tiny model, 200 streams) one thread here served 1.6x the tokens of two.
        torch.set_num_threads(max(1, available_cpus() - 1))
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the API process, then exit
        if isinstance(exc, ValueError):  # bad options: the message says what to change
            failure = RequestFailure(str(exc), is_bad_input=True)
        else:
            traceback.print_exc()
            failure = RequestFailure(f"{type(exc).__name__}: {exc}", is_bad_input=False)
        _send_quietly(output_conn, StartupFailed(failure))
        _exit(1)
    freeze_startup_heap("engine core")  # the process lives as long as the server
    if _send_quietly(output_conn, CoreReady(engine.get_stats())):
        EngineCoreLoop(EngineCore(engine), input_conn, output_conn).run()
    engine.shutdown()
    _exit(0)


def _send_quietly(conn: Connection, msg: Any) -> bool:
    """Sends ``msg``; False if the API process is gone."""
    try:
        conn.send(msg)
        return True
    except OSError:
        return False


def _exit(code: int) -> None:
    # Nothing is left to flush but stdio; skipping the interpreter's teardown of
    # torch makes the exit several times faster.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
