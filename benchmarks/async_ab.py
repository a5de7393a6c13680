"""A/B of asynchronous scheduling on the GPU suite's L1 and T1 (same machine, same run).

    python benchmarks/async_ab.py [--shape llama3-8b] [--modes on,off] [--skip L1]

Runs gpu_suite's kvflow L1 and T1 once per mode, each engine built with
``async_scheduling`` set, and prints the suite's table rows tagged with the mode,
plus where T1's time goes: engine steps split by the tokens they scheduled
(pure decode vs with prefill), and the time outside steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_suite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(gpu_suite.SHAPES))
    ap.add_argument("--modes", default="on,off")
    ap.add_argument("--skip", default="")
    ap.add_argument("--runs", type=int, default=1, help="T1 runs per mode (median)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = gpu_suite.SHAPES[args.shape]
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    bw, _ = gpu_suite.ceilings()
    plain = gpu_suite.kvflow_llm
    for mode in args.modes.split(","):
        stats: dict[str, list[float]] = defaultdict(list)

        def tagged(model_dir: str, _mode: str = mode, **kw):
            llm = plain(model_dir, async_scheduling=_mode == "on", **kw)
            instrument(llm.llm_engine, stats)
            return llm

        gpu_suite.kvflow_llm = tagged
        print(f"--- async_scheduling={mode}", flush=True)
        if "L1" not in skip:
            gpu_suite.l1(model_dir, cfg, bw, quick=True)
        if "T1" not in skip:
            stats.clear()
            gpu_suite.t1(model_dir, quick=args.runs == 1)
            for kind, times in sorted(stats.items()):
                print(f"  T1 steps {kind}: {len(times)} steps, {sum(times):.2f} s, "
                      f"median {sorted(times)[len(times) // 2] * 1e3:.2f} ms", flush=True)


def instrument(engine, stats: dict[str, list[float]]) -> None:
    """Times each engine step, keyed by what the scheduler gave it (decode-only or not)."""
    schedule, step = engine.scheduler.schedule, engine.step
    last = {"kind": "idle"}

    def timed_schedule():
        out = schedule()
        n = len(out.num_scheduled_tokens)
        last["kind"] = ("empty" if out.is_empty else
                        "decode-only" if out.total_num_scheduled_tokens == n else "with prefill")
        return out

    def timed_step():
        t = time.perf_counter()
        outs = step()
        stats[last["kind"]].append(time.perf_counter() - t)
        return outs

    engine.scheduler.schedule = timed_schedule
    engine.step = timed_step


if __name__ == "__main__":
    main()
