"""MPCoreClient: the engine in the engine core process (core_proc.py), behind two pipes.

The client's ends of the pipes are served by two threads, so that the event
loop never blocks on a pipe:

    event loop ── pickled message ──► outbox ──► writer thread ──► input pipe ──► core
    event loop ◄─ call_soon_threadsafe ◄── reader thread ◄── output pipe ◄─────── core
                  (decoded outputs, failures)   (keeps the latest stats)

A full input pipe makes the writer wait, not a request handler; the reader
unpickles and decodes each ``CoreOutputs`` off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util
import pickle
import queue
import threading
from typing import Any, Callable, Optional

from kvflow.config import EngineConfig
from kvflow.engine.core_client import (
    SHUT_DOWN_MESSAGE,
    BaseCoreClient,
    EngineDeadError,
    OutputSink,
)
from kvflow.engine.core_messages import (
    AbortRequests,
    CoreOutputs,
    CoreReady,
    OutputDecoder,
    ProfileControl,
    Shutdown,
    StartupFailed,
)
from kvflow.engine.core_proc import run_engine_core
from kvflow.engine.engine_core import AddRequest, RequestFailure
from kvflow.engine.llm_engine import EngineStats
from kvflow.executor.multiproc import describe_exit
from kvflow.outputs import RequestOutput
from kvflow.tokenizer import load_tokenizer

logger = logging.getLogger("kvflow.engine")

_OUTPUT_PIPE_BYTES = 1 << 20
"""Buffer of the core's output pipe (Linux; the default is 64 KiB, two or three steps of
outputs): the core must not wait on its send while this process's GIL is busy elsewhere."""
_STOP_TIMEOUT_S = 10.0
"""How long the core may take to shut down (its tensor-parallel workers included)
before it is terminated."""


class MPCoreClient(BaseCoreClient):
    """The engine in the engine core process; this side pickles, sends and routes.

    The tokenizer and the config are loaded here too (chat templates,
    /tokenize, request checks); the weights only in the core.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        ctx = mp.get_context("spawn")  # a fork would copy this process's CUDA state and threads
        input_read, self._input = ctx.Pipe(duplex=False)
        self._output, output_write = ctx.Pipe(duplex=False)
        _grow_pipe(self._output.fileno(), _OUTPUT_PIPE_BYTES)
        # Not a daemon: the core's tensor-parallel workers are its children, and a daemon
        # may have none. The finalizer below stops it instead, at exit too.
        self.proc = ctx.Process(target=run_engine_core, name="kvflow-engine-core",
                                args=(config, input_read, output_write))
        self.proc.start()
        # The core holds its own ends now; closing ours makes its death an EOF here.
        input_read.close()
        output_write.close()
        self._outbox: queue.SimpleQueue[Optional[bytes]] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="kvflow-core-writer",
                                        daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="kvflow-core-reader",
                                        daemon=True)
        # Runs at shutdown(), or at interpreter exit before multiprocessing joins its
        # children (exitpriority), which would wait forever for a core never told to stop.
        self._stopping = threading.Event()  # set by whoever stops the core; its EOF is no death
        self._finalizer = multiprocessing.util.Finalize(
            self, _stop_core,
            args=(self.proc, self._stopping, self._outbox, self._writer, self._input),
            exitpriority=10)
        self._lock = threading.Lock()  # guards _loop/_sink against the reader's _dead
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._sink: Optional[OutputSink] = None
        self._dead: Optional[EngineDeadError] = None
        self._decoder = OutputDecoder()  # the reader thread's
        try:
            mc = config.model_config
            # Loaded while the core loads the weights.
            self._tokenizer = (None if config.skip_tokenizer_init else
                               load_tokenizer(mc.tokenizer, trust_remote_code=mc.trust_remote_code))
            self._stats = self._wait_ready()
        except BaseException:  # a start-up error (the core has exited) or Ctrl-C
            if self.proc.is_alive():
                self.proc.terminate()
            self._finalizer()
            raise
        self._writer.start()
        self._reader.start()
        logger.info("engine core process started (pid %s)", self.proc.pid)

    def _wait_ready(self) -> EngineStats:
        """Blocks until the core reports; raises its startup error here."""
        multiprocessing.connection.wait([self._output, self.proc.sentinel])
        msg = None
        if self._output.poll():  # a reply and an exit both come: the reply says why
            try:
                msg = self._output.recv()
            except EOFError:
                pass
        if isinstance(msg, CoreReady):
            return msg.stats
        if isinstance(msg, StartupFailed):
            if msg.failure.is_bad_input:
                raise ValueError(msg.failure.message)
            raise RuntimeError(f"The engine core process failed to start: "
                               f"{msg.failure.message} (its traceback is in the log above).")
        self.proc.join(1.0)
        raise RuntimeError(f"The engine core process (pid {self.proc.pid}) "
                           f"{describe_exit(self.proc.exitcode)} while starting; the log above "
                           "may say why.")

    # ------------------------------------------------------------------ interface
    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def get_stats(self) -> EngineStats:
        return self._stats

    @property
    def dead_error(self) -> Optional[EngineDeadError]:
        return self._dead

    def start(self, sink: OutputSink) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop not in (None, loop) and not self._loop.is_closed():
                raise RuntimeError("This AsyncLLM serves another event loop, which is still "
                                   "open; use one AsyncLLM per event loop.")
            self._loop, self._sink = loop, sink
            dead = self._dead
        if dead is not None:
            sink.on_dead(dead)

    async def add_request(self, req: AddRequest) -> None:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        self._send(req)

    async def abort(self, request_ids: list[str]) -> None:
        if self._dead is None and not self._stopping.is_set():
            self._send(AbortRequests(request_ids))

    async def profile(self, start: bool) -> None:
        """Sent, not awaited: the core applies it before its next step and logs any
        refusal (profiling not configured, or already in that state)."""
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        self._send(ProfileControl(start))

    async def shutdown(self, request_ids: list[str]) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if request_ids and self._dead is None:
            self._send(AbortRequests(request_ids))
        loop = asyncio.get_running_loop()
        # Blocking joins, off the event loop: the core sends the aborts' outputs, exits,
        # and the reader, at EOF, has handed every message to the loop before it ends.
        await loop.run_in_executor(None, self._finalizer)
        if self._reader.ident is not None:
            await loop.run_in_executor(None, self._reader.join, _STOP_TIMEOUT_S)
        self._output.close()

    # ------------------------------------------------------------------ threads
    def _send(self, msg: Any) -> None:
        # Pickled here, so a message that cannot be sent fails its caller.
        self._outbox.put(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _write_loop(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self._input.send_bytes(data)
            except OSError:
                return  # the core is gone; the reader tells

    def _read_loop(self) -> None:
        cause = None
        while True:
            try:
                msg: CoreOutputs = self._output.recv()
            except (EOFError, OSError):
                break
            try:
                self._stats = msg.stats
                outputs = [self._decoder.decode(wire) for wire in msg.outputs]
            except Exception as exc:  # a bug here: without a reader every request would hang
                logger.exception("could not read the engine core's outputs; stopping it")
                cause = f"sent outputs this process could not read ({type(exc).__name__}: {exc})"
                self.proc.kill()
                break
            if outputs or msg.failures:
                self._post(self._dispatch, (outputs, msg.failures))
        if self._stopping.is_set():
            error = EngineDeadError(SHUT_DOWN_MESSAGE)
        else:
            self.proc.join(_STOP_TIMEOUT_S)  # its exit code names the cause
            error = EngineDeadError(
                f"The engine core process (pid {self.proc.pid}) "
                f"{cause or describe_exit(self.proc.exitcode)}; the requests it held are lost "
                "and this server can generate no more. Restart it, or retry on another replica.")
            logger.error("%s", error)
        with self._lock:
            self._dead = error
        if not self._stopping.is_set():
            self._post(self._on_dead, error)

    def _post(self, callback: Callable[[Any], None], arg: Any) -> None:
        """Runs ``callback(arg)`` on the bound event loop (none bound: no request exists)."""
        with self._lock:
            loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:
            pass  # the loop is closed: nobody waits for this

    def _dispatch(self, turn: tuple[list[RequestOutput], dict[str, RequestFailure]]) -> None:
        assert self._sink is not None
        outputs, failures = turn
        if failures:
            self._sink.on_failures(failures)
        if outputs:
            self._sink.on_outputs(outputs)

    def _on_dead(self, error: EngineDeadError) -> None:
        assert self._sink is not None
        self._sink.on_dead(error)


def _grow_pipe(fd: int, num_bytes: int) -> None:
    """Raises a pipe's buffer where the OS allows (Linux, up to /proc/sys/fs/pipe-max-size)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, num_bytes)
    except (ImportError, AttributeError, OSError):
        pass  # the default buffer only delays the core's sends a little more often


def _stop_core(proc: Any, stopping: threading.Event,
               outbox: "queue.SimpleQueue[Optional[bytes]]", writer: threading.Thread,
               input_conn: multiprocessing.connection.Connection) -> None:
    """Asks the core to exit, then terminates, then kills it; leaves no process behind.

    Holds no reference to the client: a finalizer's callback must not keep it alive.
    """
    stopping.set()
    outbox.put(pickle.dumps(Shutdown(), protocol=pickle.HIGHEST_PROTOCOL))
    outbox.put(None)
    if writer.ident is not None:
        writer.join(_STOP_TIMEOUT_S)
    input_conn.close()  # a core that missed Shutdown sees EOF
    proc.join(_STOP_TIMEOUT_S)
    if proc.is_alive():
        logger.warning("the engine core process did not exit in %.0f s; terminating it",
                       _STOP_TIMEOUT_S)
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
