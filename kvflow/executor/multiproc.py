"""Tensor parallelism on one machine: N spawned worker processes, one per rank.

The engine's process only schedules; every rank holds its shard of the
weights and of the KV cache and runs the same step::

    driver (LLMEngine)                              rank r (spawned process)
    ──────────────────                              ────────────────────────
    pickle (seq, method, args, reply_ranks) once
      ── command pipe r ──────────────────────────► recv ─► Worker.method(*args)
                                                    (collectives between ranks:
                                                     gloo on CPU, NCCL on GPU)
    wait(result pipes + process sentinels) ◄─ result pipe r ── (seq, "ok", value)
                                                            or (seq, "error", text)

Every rank runs the whole step, sampler included, on the same all-gathered
logits with identically seeded generators, but only rank 0 (``OUTPUT_RANK``)
sends its ``ModelRunnerOutput`` back: one reply per step instead of N. Its
tokens reach every rank in the next step's SchedulerOutput, so the ranks'
request states cannot drift even if their own samples ever differed. Calls
whose answer every rank contributes to (``determine_num_blocks``: the
minimum over ranks) or that must be known to have succeeded everywhere
(``init_cache``) are answered by all ranks.

Ranks are spawned, not forked (fork would copy the driver's CUDA state), so
a script that creates a tensor-parallel LLM needs the usual
``if __name__ == "__main__":`` guard.

Failure model (why there are no hangs): the driver never blocks on one
rank's pipe; it waits on all result pipes and all process sentinels at once.
A rank that raises sends its traceback and exits; a rank that is killed
closes its pipe and fires its sentinel. Either wakes the driver, which looks
for a moment longer at the other ranks (a killed rank makes its peers fail
in their collectives, and the dead one is the cause to name), then stops
every process and raises one ``RuntimeError`` naming the rank(s). The one
case this cannot see, live ranks deadlocked inside a collective, ends at
torch.distributed's collective timeout, which raises on the ranks.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Iterable, NoReturn, Optional

import torch

from kvflow.config import EngineConfig
from kvflow.core.scheduler import ModelRunnerOutput, SchedulerOutput
from kvflow.distributed.utils import (get_open_port, init_rank_environment,
                                      verify_tensor_parallel_layout)
from kvflow.executor.base import BaseExecutor

logger = logging.getLogger("kvflow")

OUTPUT_RANK = 0
"""The rank whose ModelRunnerOutput the driver takes (all ranks compute the same)."""

_SHUTDOWN = "__shutdown__"
_GRACE_S = 1.0
"""How long, after a first failure, the driver keeps listening to the other ranks."""
_STOP_TIMEOUT_S = 5.0
"""How long a graceful shutdown may take before the ranks are terminated."""


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    """cuda:<local_rank> on GPU (of the GPUs this process may see), else the CPU."""
    if config.device_config.device.type == "cuda":
        return torch.device("cuda", local_rank)
    return config.device_config.device


# ---------------------------------------------------------------------------- rank side
def _send_error(conn: Connection, seq: int, rank: int, what: str, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print(f"[kvflow tp rank {rank}] {what} failed:\n{text}", file=sys.stderr, flush=True)
    try:
        conn.send((seq, "error", f"{type(exc).__name__}: {exc}\n{text}"))
    except OSError:
        pass  # the driver is gone; nobody to tell


def _rank_main(config: EngineConfig, rank: int, world_size: int, init_method: str,
               cmd_conn: Connection, result_conn: Connection) -> None:
    """Body of one rank's process: build the shard, then serve calls until told to stop.

    Exits when the driver sends the shutdown call or when its command pipe
    reaches EOF (the driver died), so no rank outlives its engine.
    """
    # Ctrl-C reaches the whole process group; the driver decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from kvflow.distributed.parallel_state import destroy_tensor_parallel
    from kvflow.gc_freeze import freeze_startup_heap
    from kvflow.worker.worker import Worker

    try:
        device = rank_device(config, rank)
        init_rank_environment(rank, world_size, device, init_method)
        worker = Worker(config, device=device)
        freeze_startup_heap(f"rank {rank}")  # a rank lives as long as its engine
        result_conn.send((0, "ok", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, then exit
        _send_error(result_conn, 0, rank, "startup", exc)
        os._exit(1)
    while True:
        try:
            data = cmd_conn.recv_bytes()
        except (EOFError, OSError):
            break  # the driver is gone
        seq, method, args, reply_ranks = pickle.loads(data)
        if method == _SHUTDOWN:
            break
        try:
            result = getattr(worker, method)(*args)
            if rank in reply_ranks:
                result_conn.send((seq, "ok", result))
        except BaseException as exc:  # noqa: BLE001
            _send_error(result_conn, seq, rank, method, exc)
            # Peers may be blocked in a collective this rank will never join;
            # exit at once (the driver stops them) rather than unwind into
            # process-group teardown.
            os._exit(1)
    destroy_tensor_parallel()
    # Nothing is left to flush but stdio; skipping the interpreter's teardown of torch
    # makes shutdown several times faster.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------- driver side
def describe_exit(exitcode: Optional[int]) -> str:
    """Words for a process's exit code: 'was killed by signal SIGKILL', 'exited with code 1'."""
    if exitcode is None:
        return "closed its pipe while still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = " (SIGKILL often means the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"was killed by signal {name}{hint}"
    return f"exited with code {exitcode}"


def format_failure(what: str, dead: dict[int, str], errors: dict[int, str],
                   pids: dict[int, Optional[int]]) -> str:
    """One message naming every failed rank; ranks that died come first (likely causes)."""
    lines = []
    for rank, how in sorted(dead.items()):
        lines.append(f"tensor-parallel worker rank {rank} (pid {pids.get(rank)}) {how}")
    for rank, text in sorted(errors.items()):
        lines.append(f"tensor-parallel worker rank {rank} (pid {pids.get(rank)}) raised "
                     f"{text.rstrip()}")
    first = min(dead) if dead else min(errors)
    head = (f"Engine stopped: tensor-parallel worker rank {first} failed during {what}; "
            "every worker was shut down. Create a new LLM to continue.")
    return head + "\n" + "\n".join(lines)


def _stop_ranks(procs: list[Any], cmd_conns: list[Connection],
                result_conns: list[Connection]) -> None:
    """Asks each rank to exit, then terminates, then kills; leaves no process behind.

    Runs from ``shutdown()``, from garbage collection of the executor and at
    interpreter exit (``weakref.finalize``), so it holds no reference to it.
    """
    msg = pickle.dumps((0, _SHUTDOWN, (), ()))
    for conn in cmd_conns:
        try:
            conn.send_bytes(msg)
        except OSError:
            pass
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in [*cmd_conns, *result_conns]:
        conn.close()


class MultiProcExecutor(BaseExecutor):
    """One spawned process per tensor-parallel rank; the calling process only schedules."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from kvflow.models.registry import describe_model

        mc = config.model_config
        self.world_size = config.parallel_config.tensor_parallel_size
        desc = describe_model(mc.architecture, mc.hf_config)
        # Before any process starts: a bad split is the user's ValueError, not a worker crash.
        verify_tensor_parallel_layout(self.world_size, desc.num_heads, desc.num_kv_heads)
        if config.device_config.device.type == "cuda" and \
                self.world_size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size={self.world_size} exceeds the "
                f"{torch.cuda.device_count()} visible GPUs. Lower tensor_parallel_size or "
                "expose more GPUs (CUDA_VISIBLE_DEVICES).")
        self._failure: Optional[str] = None
        self._seq = 0
        ctx = mp.get_context("spawn")  # fork would copy the driver's CUDA state and threads
        init_method = f"tcp://127.0.0.1:{get_open_port()}"
        self._procs: list[Any] = []
        self._cmd_conns: list[Connection] = []
        self._result_conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop_ranks, self._procs, self._cmd_conns,
                                           self._result_conns)
        try:
            for rank in range(self.world_size):
                cmd_read, cmd_write = ctx.Pipe(duplex=False)
                res_read, res_write = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_rank_main, name=f"kvflow-tp-rank{rank}",
                                   daemon=True, args=(config, rank, self.world_size,
                                                      init_method, cmd_read, res_write))
                proc.start()
                # The child holds its own copies now; closing ours makes its death an EOF here.
                cmd_read.close()
                res_write.close()
                self._procs.append(proc)
                self._cmd_conns.append(cmd_write)
                self._result_conns.append(res_read)
            self._collect("startup", range(self.world_size), seq=0)
        except BaseException:  # a failed rank (already stopped) or Ctrl-C: stop what started
            self.shutdown()
            raise
        logger.info("Started %d tensor-parallel workers (pids %s)", self.world_size,
                    self.worker_pids)

    @property
    def worker_pids(self) -> list[Optional[int]]:
        return [p.pid for p in self._procs]

    # ------------------------------------------------------------------ calls
    def _run(self, method: str, args: tuple, reply_ranks: Optional[Iterable[int]] = None
             ) -> dict[int, Any]:
        """Sends one call to every rank; returns {rank: result} of the ranks that reply."""
        if self._failure is not None:
            raise RuntimeError(self._failure)
        want = tuple(range(self.world_size) if reply_ranks is None else reply_ranks)
        self._seq += 1
        # Pickled once, whatever the number of ranks.
        data = pickle.dumps((self._seq, method, args, want), protocol=pickle.HIGHEST_PROTOCOL)
        sent = 0
        try:
            for rank, conn in enumerate(self._cmd_conns):
                try:
                    # Cannot block for long: a rank is at most one step behind (it must join
                    # the collectives of the step rank 0 answered), so it is reading soon;
                    # a dead rank makes this raise instead.
                    conn.send_bytes(data)
                    broken = False
                except OSError:
                    broken = True
                if broken:  # outside the except: the RuntimeError needs no EOF context
                    self._fail(method, {}, {rank})
                sent += 1
        except KeyboardInterrupt:
            if 0 < sent < self.world_size:
                # Some ranks have the call and would wait forever in its collectives
                # for the others: there is no consistent state to go back to.
                self._failure = (f"Engine stopped: interrupted while sending {method} to the "
                                 f"tensor-parallel workers ({sent} of {self.world_size} had it). "
                                 "Create a new LLM to continue.")
                self.shutdown()
            raise
        # Interrupted from here on, every rank has the same call; its late answer is
        # recognised by its seq and skipped by the next call.
        return self._collect(method, want, seq=self._seq)

    def _collect(self, what: str, want: Iterable[int], seq: int) -> dict[int, Any]:
        pending, results = set(want), {}
        conn_rank = {id(c): r for r, c in enumerate(self._result_conns)}
        sentinel_rank = {p.sentinel: r for r, p in enumerate(self._procs)}
        while pending:
            ready = wait([*self._result_conns, *sentinel_rank])
            # Replies before sentinels: a rank that reported an error and exited
            # fires both, and its message is the better explanation.
            for obj in sorted(ready, key=lambda o: isinstance(o, int)):
                if isinstance(obj, int):
                    rank = sentinel_rank[obj]
                    if not self._result_conns[rank].poll():
                        self._fail(what, {}, {rank})
                    continue
                rank = conn_rank[id(obj)]
                try:
                    msg_seq, status, value = obj.recv()
                except (EOFError, OSError):
                    msg_seq, status, value = seq, "eof", None
                if status == "eof":  # outside the except: the RuntimeError needs no EOF context
                    self._fail(what, {}, {rank})
                if status == "error":
                    self._fail(what, {rank: value}, set())
                if msg_seq != seq:
                    continue  # the answer of a call interrupted earlier (Ctrl-C)
                if rank not in pending:
                    raise AssertionError(f"rank {rank} answered {what} twice")
                results[rank] = value
                pending.discard(rank)
        return results

    def _fail(self, what: str, errors: dict[int, str], suspects: set[int]) -> NoReturn:
        """Gathers what every rank has to say for ``_GRACE_S``, stops them all, raises."""
        errors = dict(errors)
        deadline = time.monotonic() + _GRACE_S
        while True:
            live = {p.sentinel: r for r, p in enumerate(self._procs)
                    if p.exitcode is None and r not in errors}
            if not live or time.monotonic() >= deadline:
                break
            conns = {id(self._result_conns[r]): r for r in live.values()}
            ready = wait([*(self._result_conns[r] for r in live.values()), *live],
                         timeout=max(0.0, deadline - time.monotonic()))
            for obj in ready:
                rank = live[obj] if isinstance(obj, int) else conns[id(obj)]
                conn = self._result_conns[rank]
                try:
                    while conn.poll():
                        _, status, value = conn.recv()
                        if status == "error":
                            errors[rank] = value
                except (EOFError, OSError):
                    self._procs[rank].join(_GRACE_S)
                if isinstance(obj, int):
                    self._procs[rank].join(0.1)
        dead = {}
        for rank, proc in enumerate(self._procs):
            if rank in errors:
                continue
            if proc.exitcode is not None or rank in suspects:
                proc.join(0.1)
                dead[rank] = describe_exit(proc.exitcode)
        if not dead and not errors:  # cannot happen: something woke us up
            dead = {r: "stopped answering" for r in suspects}
        pids = {r: p.pid for r, p in enumerate(self._procs)}
        self._failure = format_failure(what, dead, errors, pids)
        if what == "startup" and not errors:
            self._failure += (
                "\nA rank that exits at startup without a traceback is often a script that "
                "creates the LLM without an `if __name__ == \"__main__\":` guard: the ranks "
                "are spawned processes, which import the script again.")
        for proc in self._procs:  # survivors may be stuck in a collective: no goodbyes
            if proc.is_alive():
                proc.kill()
        self.shutdown()
        raise RuntimeError(self._failure)

    # ------------------------------------------------------------------ interface
    def determine_num_blocks(self) -> int:
        return min(self._run("determine_num_blocks", ()).values())

    def init_cache(self, num_blocks: int) -> None:
        self._run("init_cache", (num_blocks,))

    def start_profile(self, trace_dir: str) -> None:
        self._run("start_profile", (trace_dir,))

    def stop_profile(self) -> None:
        self._run("stop_profile", ())

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self._run("execute_model", (sched,), reply_ranks=(OUTPUT_RANK,))[OUTPUT_RANK]

    def shutdown(self) -> None:
        if self._failure is None:
            self._failure = "The engine was shut down; create a new LLM to continue."
        self._finalizer()
