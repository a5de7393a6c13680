"""A per-step record of what the engine ran and when, for reading a latency tail.

Set ``KVFLOW_STEP_TRACE=FILE`` and every engine step appends one JSON line::

    {"step": 12, "reqs": 19, "single": 18, "tokens": 82,
     "scheduled": 1234.5671, "launched": 1234.5675, "done": 1234.5752}

``single`` counts requests computing one token (decodes, and one-token prompt
tails), so ``tokens - single`` is the step's prefill work; times are
``time.perf_counter()`` seconds: the step was scheduled, handed to the workers,
and its sampled tokens were read back. Consecutive ``done`` stamps of a loaded
engine are its step times (asynchronously scheduled, step N+1 is launched before
step N is read). Why a file and not the logger: a serving benchmark's ten
thousand steps would flood the log and cost a format each; a line here is one
``json.dumps`` and is only paid when asked for.
"""

from __future__ import annotations

import json
import time
from typing import IO, Optional

from kvflow import envs
from kvflow.core.scheduler import SchedulerOutput


class StepTrace:
    """Appends one line per step to ``path``; a no-op object when ``path`` is None."""

    def __init__(self, path: Optional[str]) -> None:
        self._file: Optional[IO[str]] = open(path, "a", buffering=1) if path else None
        self._count = 0
        self._open: dict[int, dict] = {}

    @classmethod
    def from_env(cls) -> "StepTrace":
        return cls(envs.step_trace_path())

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def launched(self, sched: SchedulerOutput, scheduled_at: float) -> None:
        """Notes a step handed to the workers (``scheduled_at``: before ``schedule()``)."""
        if self._file is None:
            return
        counts = sched.num_scheduled_tokens.values()
        self._open[id(sched)] = {
            "step": self._count, "reqs": len(sched.num_scheduled_tokens),
            "single": sum(1 for n in counts if n == 1),
            "tokens": sched.total_num_scheduled_tokens,
            "scheduled": scheduled_at, "launched": time.perf_counter()}
        self._count += 1

    def done(self, sched: SchedulerOutput) -> None:
        """Writes the step's line once its tokens were read back."""
        if self._file is None:
            return
        record = self._open.pop(id(sched), None)
        if record is not None:
            record["done"] = time.perf_counter()
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
