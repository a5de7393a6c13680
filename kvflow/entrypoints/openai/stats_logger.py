"""The server's periodic load line, as vLLM's: throughput, queue and KV cache, while busy.

Every ``KVFLOW_LOG_STATS_INTERVAL`` seconds (default 10) ``kvflow serve`` logs::

    Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 1903.1 tokens/s,
    Running: 17 reqs, Waiting: 0 reqs, KV cache usage: 3.1%, Prefix cache hit rate: 12.5%

averaged over the interval (the hit rate too: hits over lookups since the last line).
An idle interval (no token moved, nothing running or waiting) logs nothing, so an idle
server stays quiet. ``--disable-log-stats`` turns it off. Why a log line beside
/metrics: an operator tailing the log sees load and saturation without a Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

logger = logging.getLogger("kvflow.entrypoints.openai")


class StatsLogger:
    """Turns successive engine stats snapshots into one line per busy interval."""

    def __init__(self, get_stats: Callable[[], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.get_stats = get_stats
        self.clock = clock
        self._last = get_stats()
        self._last_time = clock()

    def line(self) -> Optional[str]:
        """The line for the interval since the previous call, or None if it was idle."""
        stats, now = self.get_stats(), self.clock()
        last, seconds = self._last, max(now - self._last_time, 1e-9)
        self._last, self._last_time = stats, now
        prompt = stats.prompt_tokens_total - last.prompt_tokens_total
        generated = stats.generation_tokens_total - last.generation_tokens_total
        if not (prompt or generated or stats.num_running or stats.num_waiting):
            return None
        queries = stats.prefix_cache_queries - last.prefix_cache_queries
        hits = stats.prefix_cache_hits - last.prefix_cache_hits
        return (f"Avg prompt throughput: {prompt / seconds:.1f} tokens/s, "
                f"Avg generation throughput: {generated / seconds:.1f} tokens/s, "
                f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%, "
                f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%")

    async def run(self, interval: float) -> None:
        """Logs a line every ``interval`` seconds of a busy engine, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                text = self.line()
            except Exception:  # a dead engine is reported elsewhere
                logger.debug("stats snapshot failed", exc_info=True)
                continue
            if text is not None:
                logger.info(text)
