"""The server's periodic load line: rates over the interval, quiet when idle, the flag."""

from __future__ import annotations

import asyncio
import logging

from kvflow.engine.llm_engine import EngineStats
from kvflow.entrypoints import cli
from kvflow.entrypoints.openai.stats_logger import StatsLogger


def _stats(prompt=0, generated=0, running=0, waiting=0, usage=0.0, queries=0, hits=0):
    return EngineStats(num_running=running, num_waiting=waiting, kv_cache_usage=usage,
                       prompt_tokens_total=prompt, generation_tokens_total=generated,
                       num_preemptions=0, prefix_cache_queries=queries, prefix_cache_hits=hits)


class _Feed:
    """Snapshots and clock readings handed out in order."""

    def __init__(self, snapshots, times):
        self.snapshots, self.times = list(snapshots), list(times)

    def stats(self):
        return self.snapshots.pop(0)

    def clock(self):
        return self.times.pop(0)


def test_line_averages_over_the_interval_and_is_quiet_when_idle():
    feed = _Feed([_stats(prompt=100, generated=10, queries=100, hits=0),
                  _stats(prompt=1100, generated=510, running=3, waiting=1, usage=0.25,
                         queries=1100, hits=250),
                  _stats(prompt=1100, generated=510),  # nothing moved, nothing queued
                  _stats(prompt=1100, generated=510, waiting=2)],  # queued: worth a line
                 [0.0, 10.0, 20.0, 25.0])
    logger = StatsLogger(feed.stats, clock=feed.clock)
    assert logger.line() == (
        "Avg prompt throughput: 100.0 tokens/s, Avg generation throughput: 50.0 tokens/s, "
        "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%")
    assert logger.line() is None
    assert logger.line() == (
        "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0 tokens/s, "
        "Running: 0 reqs, Waiting: 2 reqs, KV cache usage: 0.0%, Prefix cache hit rate: 0.0%")


def test_run_logs_busy_intervals_and_survives_a_failing_snapshot(caplog):
    calls = {"n": 0}

    def stats():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("engine gone for a moment")
        return _stats(generated=5 * calls["n"], running=1)

    async def main():
        task = asyncio.ensure_future(StatsLogger(stats).run(0.01))
        await asyncio.sleep(0.2)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="kvflow.entrypoints.openai"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "Avg generation throughput" in r.getMessage()]
    assert len(lines) >= 2 and all("Running: 1 reqs" in line for line in lines)


def test_serve_logs_stats_by_default_and_offline_commands_do_not():
    parser = cli.build_parser()
    assert parser.parse_args(["serve", "m"]).disable_log_stats is False
    assert parser.parse_args(["serve", "m", "--disable-log-stats"]).disable_log_stats is True
    assert parser.parse_args(["generate", "--model", "m", "hi"]).disable_log_stats is True
