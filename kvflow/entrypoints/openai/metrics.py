"""Prometheus metrics with vLLM's names under the ``kvflow:`` prefix.

Two sources, two mechanisms:

- Engine state (running/waiting requests, KV usage, token counters) is read
  from ``AsyncLLM.get_stats()`` at scrape time by a custom collector, so a
  scrape always shows the present (KV usage drops to 0 the moment nothing
  runs) and the engine keeps no Prometheus objects of its own.
- Per-request latencies are histograms the serving layer observes once per
  finished request, from the ``RequestMetrics`` times the engine stamped.

Each app gets its own ``CollectorRegistry``: two servers (or two tests) in one
process never share or collide on metrics.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvflow.outputs import RequestMetrics

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000)


class _EngineStatsCollector(Collector):
    """Reads the engine's counters at scrape time."""

    def __init__(self, async_llm: Any, model_name: str) -> None:
        self.async_llm = async_llm
        self.labels = [model_name]

    def collect(self) -> Iterator[Any]:
        stats = self.async_llm.get_stats()
        names = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(self.labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(self.labels, value)
            return c

        yield gauge("kvflow:num_requests_running", "Requests in the running batch.",
                    stats.num_running)
        yield gauge("kvflow:num_requests_waiting", "Requests waiting to be scheduled.",
                    stats.num_waiting)
        yield gauge("kvflow:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                    stats.kv_cache_usage)
        yield counter("kvflow:prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens_total)
        yield counter("kvflow:generation_tokens", "Tokens generated.",
                      stats.generation_tokens_total)
        yield counter("kvflow:num_preemptions", "Requests preempted for lack of KV blocks.",
                      stats.num_preemptions)
        yield counter("kvflow:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("kvflow:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits)


class ServerMetrics:
    """The metrics of one server app; ``registry`` is what /metrics renders."""

    def __init__(self, async_llm: Any, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineStatsCollector(async_llm, model_name))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            """This model's child of a histogram registered here."""
            return Histogram(f"kvflow:{name}", doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from arrival to the first output token.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Time from arrival to the last output token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between two output tokens of a request.", _ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per request: (last token - first token) / (output tokens - 1).",
                              _ITL_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Time from arrival to first being scheduled.", _LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds",
                                 "Time from first being scheduled to the first token.",
                                 _LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds",
                                "Time from the first token to the last.", _LATENCY_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens per request.",
                                    _TOKEN_BUCKETS)
        self.output_len = histogram("request_generation_tokens", "Generated tokens per request.",
                                    _TOKEN_BUCKETS)
        self._success = Counter(
            "kvflow:request_success", "Requests finished, by finish reason.",
            labels + ["finished_reason"], registry=self.registry)

    def observe_finished(self, metrics: Optional[RequestMetrics], num_prompt_tokens: int,
                         num_output_tokens: int, finish_reason: Optional[str]) -> None:
        """Records one finished engine request. ``metrics`` times are ``time.monotonic``."""
        self._success.labels(self.model_name, finish_reason or "abort").inc()
        self.prompt_len.observe(num_prompt_tokens)
        self.output_len.observe(num_output_tokens)
        if metrics is None:
            return
        if metrics.first_token_time is not None:
            self.ttft.observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
        end = metrics.finished_time or metrics.last_token_time
        if end is not None and finish_reason != "abort":
            self.e2e.observe(max(0.0, end - metrics.arrival_time))
        first, last = metrics.first_token_time, metrics.last_token_time
        if metrics.first_scheduled_time is not None:
            self.queue.observe(max(0.0, metrics.first_scheduled_time - metrics.arrival_time))
            if first is not None:
                self.prefill.observe(max(0.0, first - metrics.first_scheduled_time))
        if first is not None and last is not None and finish_reason != "abort":
            self.decode.observe(max(0.0, last - first))
            if num_output_tokens > 1:
                self.tpot.observe(max(0.0, last - first) / (num_output_tokens - 1))
        # With n > 1 several samples stamp the same step; distinct times are the steps.
        prev: Optional[float] = None
        for t in metrics.token_times:
            if prev is not None and t > prev:
                self.itl.observe(t - prev)
            prev = t
