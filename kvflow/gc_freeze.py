"""Python's garbage collector against a serving loop's latency: freeze the start-up heap.

A full collection walks every object the collector tracks. After start-up that is
torch, transformers, FastAPI and the model's modules: a few hundred thousand
objects that will live as long as the process. Under load the per-step garbage
(requests, outputs, chunks) triggers a full collection now and then, and walking
that heap paused the engine core ~80 ms in one S1 run on the H100 (KVFLOW_STEP_TRACE,
benchmarks/RESULTS.md): one stalled step that every running request's TPOT pays.
``gc.freeze()`` moves the objects alive now into a permanent generation that
collections skip; what is allocated afterwards is collected as before.

Only the long-lived serving processes freeze (the engine core process, the API
server process once its app starts): an offline ``LLM`` does not, so that
``del llm; gc.collect()`` still frees an engine caught in a reference cycle.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("kvflow")


def freeze_startup_heap(where: str) -> int:
    """Collects once (frozen garbage would never be freed), then freezes every object
    alive; returns how many are frozen now. Call it when start-up is over."""
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    logger.debug("%s: %d start-up objects frozen out of garbage collection", where, count)
    return count
