"""Serving benchmark: an OpenAI streaming load generator, like vLLM's serving benchmark.

Sends N completion requests to a running server (``kvflow serve``, vLLM, any
OpenAI-compatible server), each a prompt of random token ids with
``ignore_eos`` so that every request produces exactly ``--output-len`` tokens,
with Poisson arrivals at ``--request-rate`` (``inf``: all at once). Reports, as
JSON and as one markdown table row:

- TTFT: arrival to the first streamed token;
- TPOT: (latency - TTFT) / (output tokens - 1), per request;
- ITL:  time between two streamed chunks (a chunk carries one token, or
        several when the server batches them);
- E2E latency, req/s, output tok/s, total tok/s.

Against a server already running:

    kvflow serve DIR --load-format dummy --skip-tokenizer-init &
    python benchmarks/serving.py --num-prompts 500 --input-len 512 --output-len 128 \\
        --request-rate 16 --token-id-max 128000

Or self-contained (BENCHMARKS.md, workload S1): first the same engine offline on the
same prompts (the ceiling), then ``kvflow serve`` started here, one run per rate, each
row with its fraction of the offline throughput (the k-th rate draws its prompts with
seed + k, so no run finds the previous one's prompts in the prefix cache):

    python benchmarks/serving.py --serve-args "DIR --load-format dummy --skip-tokenizer-init" \\
        --offline-ceiling --request-rates 4 16 inf --num-prompts 500 --token-id-max 128000

``kvflow serve`` runs the engine in its engine core process; add
``--disable-frontend-multiprocessing`` to the serve args to measure the server with
the engine inside the server's own process (a worker thread) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx


@dataclass
class RequestResult:
    """What one request's client saw; times are time.perf_counter seconds."""

    ok: bool
    start: float
    ttft: Optional[float] = None
    latency: Optional[float] = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: Optional[str] = None


def random_prompts(num: int, input_len: int, token_id_max: int, seed: int) -> list[list[int]]:
    """Token-id prompts; ids start at 10 to stay clear of the usual special tokens."""
    rng = random.Random(seed)
    low = min(10, token_id_max - 1)
    return [[rng.randrange(low, token_id_max) for _ in range(input_len)] for _ in range(num)]


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int],
                      output_len: int, extra: dict[str, Any]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True, **extra}
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start)
    last: Optional[float] = None
    streamed_tokens = 0
    try:
        async with client.stream("POST", "/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    n_tokens = len(choice.get("token_ids") or []) or (1 if choice.get("text") else 0)
                    if n_tokens == 0:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    streamed_tokens += n_tokens
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or streamed_tokens
    result.ok = result.ttft is not None
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.num_prompts + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers,
                                 limits=limits, timeout=httpx.Timeout(None)) as client:
        model = args.model or (await client.get("/models")).json()["data"][0]["id"]
        prompts = random_prompts(args.num_prompts, args.input_len, args.token_id_max, args.seed)
        extra = json.loads(args.extra_body) if args.extra_body else {}
        for i in range(args.warmup):
            await one_request(client, model, prompts[i % len(prompts)], 4, extra)
        limiter = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
        rng = random.Random(args.seed + 1)

        async def limited(prompt: list[int]) -> RequestResult:
            async with limiter:
                return await one_request(client, model, prompt, args.output_len, extra)

        tasks = []
        bench_start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(limited(prompt)))
            if not math.isinf(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - bench_start
    if args.per_request_out:
        write_per_request(f"{args.per_request_out}.{args.request_rate:g}", results)
    return summarize(args, model, results, duration)


def write_per_request(path: str, results: list[RequestResult]) -> None:
    """One JSON line per request: start (time.perf_counter, the same monotonic clock as
    the server's KVFLOW_STEP_TRACE on this machine), TTFT, latency, TPOT, tokens."""
    with open(path, "w", encoding="utf-8") as f:
        for r in results:
            tpot = ((r.latency - r.ttft) / (r.output_tokens - 1)
                    if r.ok and r.latency is not None and r.output_tokens > 1 else None)
            f.write(json.dumps({"start": r.start, "ttft": r.ttft, "latency": r.latency,
                                "tpot": tpot, "tokens": r.output_tokens, "ok": r.ok}) + "\n")


def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _stats_ms(values: list[float]) -> dict[str, Optional[float]]:
    ms = [v * 1000 for v in values]
    return {"mean": statistics.fmean(ms) if ms else None, "p50": _pct(ms, 50),
            "p99": _pct(ms, 99)}


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult],
              duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done
             if r.latency is not None and r.ttft is not None and r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "model": model,
        "base_url": args.base_url,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "completed": len(done),
        "failed": len(errors),
        "first_errors": errors[:3],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + args.input_len * len(done)) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([x for r in done for x in r.itls]),
        "e2e_ms": _stats_ms([r.latency for r in done if r.latency is not None]),
    }


def markdown_row(s: dict[str, Any]) -> str:
    def f(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.1f}"

    fraction = s.get("fraction_of_offline")
    return (f"| {s['request_rate']} | {s['completed']}/{s['num_prompts']} "
            f"| {s['request_throughput']:.2f} | {s['output_throughput']:.1f} "
            f"| {'-' if fraction is None else f'{fraction:.0%}'} "
            f"| {f(s['ttft_ms']['p50'])} | {f(s['ttft_ms']['p99'])} "
            f"| {f(s['tpot_ms']['p50'])} | {f(s['tpot_ms']['p99'])} "
            f"| {f(s['itl_ms']['p50'])} | {f(s['itl_ms']['p99'])} |")


MARKDOWN_HEADER = ("| rate (req/s) | completed | req/s | out tok/s | vs offline | TTFT p50 ms "
                   "| TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | ITL p50 ms | ITL p99 ms |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------- self-contained runs
def offline_throughput(serve_args: list[str], prompts: list[list[int]],
                       output_len: int) -> dict[str, float]:
    """The same engine offline on the same prompts: the ceiling the server is held to.

    Runs in this process; call it in a child process so its memory is gone before
    the server starts.
    """
    from kvflow.entrypoints import cli
    from kvflow.entrypoints.llm import LLM
    from kvflow.sampling_params import SamplingParams

    ns = cli.build_parser().parse_args(["serve", *serve_args])
    engine_args = cli.engine_args_from(ns, cli._resolve_model(ns))
    llm = LLM(**{f: getattr(engine_args, f) for f in engine_args.field_names()})
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    # Warm-up: the whole workload once on other prompts (no prefix-cache hits later), so
    # that every step shape's first call (Triton compiles of eager steps, cuBLAS and CUDA
    # module loads) happens here and not in the timed pass: on a fresh machine a warm-up
    # of 8 prompts left the timed pass at 80% of its warm speed.
    others = random_prompts(len(prompts), len(prompts[0]), max(max(p) for p in prompts) + 1,
                            seed=10_000 + len(prompts))
    llm.generate([{"prompt_token_ids": p} for p in others], params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"duration_s": duration, "output_throughput": tokens / duration,
            "request_throughput": len(prompts) / duration}


class LaunchedServer:
    """``kvflow serve`` in a child process on a free loopback port, stopped with SIGTERM."""

    def __init__(self, serve_args: list[str], timeout: float = 900.0) -> None:
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        cmd = [sys.executable, "-m", "kvflow.entrypoints.cli", "serve", *serve_args,
               "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
               "--uvicorn-log-level", "warning"]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvflow serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.base_url[:-3] + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"kvflow serve not healthy after {timeout}s")

    def stop(self) -> Optional[int]:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _offline_in_child(args: argparse.Namespace) -> dict[str, float]:
    import subprocess

    cmd = [sys.executable, __file__, "--offline-only", "--serve-args", args.serve_args,
           "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--token-id-max", str(args.token_id_max),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> int:
    import shlex

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="The server's OpenAI base URL (ending in /v1).")
    p.add_argument("--serve-args", default=None,
                   help="Start `kvflow serve ARGS` here instead of using --base-url.")
    p.add_argument("--offline-ceiling", action="store_true",
                   help="With --serve-args: first run the same engine offline on the same "
                        "prompts and report each rate's fraction of its throughput.")
    p.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="Served model name (default: the first).")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrival rate in requests/s; inf sends all at once.")
    p.add_argument("--request-rates", type=float, nargs="+", default=None,
                   help="Several rates, one run each (overrides --request-rate).")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="Most requests in flight at once (default: no limit).")
    p.add_argument("--token-id-max", type=int, default=10_000,
                   help="Prompt ids are drawn from [10, this); keep it within the vocabulary.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="Short requests sent first, unmeasured.")
    p.add_argument("--extra-body", default=None, help="JSON merged into every request body.")
    p.add_argument("--result-json", default=None, help="Also write the JSON summaries here.")
    p.add_argument("--per-request-out", default=None,
                   help="Write each request's times as JSON lines to FILE.RATE (read them "
                        "beside the server's KVFLOW_STEP_TRACE).")
    args = p.parse_args(argv)
    serve_args = shlex.split(args.serve_args) if args.serve_args else None
    if args.offline_only:
        prompts = random_prompts(args.num_prompts, args.input_len, args.token_id_max, args.seed)
        print(json.dumps(offline_throughput(serve_args or [], prompts, args.output_len)))
        return 0
    offline = _offline_in_child(args) if args.offline_ceiling and serve_args else None
    server = LaunchedServer(serve_args) if serve_args else None
    summaries = []
    try:
        if server is not None:
            args.base_url = server.base_url
        base_seed = args.seed
        for i, rate in enumerate(args.request_rates or [args.request_rate]):
            # Each rate gets prompts of its own: the server's prefix cache still holds the
            # previous rate's, which would skip their prefill (an inf run after a 16 req/s
            # run on the same prompts measured 2x the offline ceiling).
            args.request_rate, args.seed = rate, base_seed + i
            summary = asyncio.run(run(args))
            if offline is not None:
                summary["offline"] = offline
                summary["fraction_of_offline"] = (summary["output_throughput"]
                                                  / offline["output_throughput"])
            summaries.append(summary)
    finally:
        exit_status = server.stop() if server is not None else None
    text = json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2)
    print(text)
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print()
    if offline is not None:
        print(f"offline ceiling: {offline['output_throughput']:.1f} out tok/s "
              f"({offline['request_throughput']:.2f} req/s)")
    if exit_status is not None:
        print(f"server exit status after SIGTERM: {exit_status}")
    print(MARKDOWN_HEADER)
    for summary in summaries:
        print(markdown_row(summary))
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
