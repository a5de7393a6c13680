"""GPU time of one forward step by shape: decode-only and mixed, CUDA graph vs eager.

    python benchmarks/step_times.py [--shape llama3-8b] [--decodes 18] [--chunks 0,32,64,128,256]

Why: under serving load (S1) a step carries a few dozen decodes and maybe one prefill
chunk; the cost a chunk adds to such a step is what the prefill cap
(``long_prefill_token_threshold``) trades against. This measures it directly on random
weights of a real shape: the step is the engine's own (its CUDAGraphRunner, its model),
inputs are made up (decodes at context ``--context``, one chunk starting at position 0),
and each figure is the median over 30 timed replays (CUDA events). "eager" runs the same
padded-free batch through the model without a graph.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_suite import SHAPES, kvflow_llm  # noqa: E402


def _time(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--decodes", default="1,18,48")
    ap.add_argument("--chunks", default="0,32,64,128,192,256")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--mixed-variants", default="1:0",
                    help="comma list of SPLITS:QTILE the mixed graphs are recaptured with "
                         "(split-KV factor; query length their attention tiles are picked for, "
                         "0 = the graph's token count); each adds a graph column")
    args = ap.parse_args()

    from kvflow.attention.metadata import AttentionMetadata
    from kvflow.worker.cuda_graphs import pad_inputs

    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[args.shape], f)
    llm = kvflow_llm(folder, max_model_len=2048, max_num_seqs=256)
    worker = llm.llm_engine.executor.worker
    runner, graphs = worker.runner, worker.runner.graph_runner
    block = llm.llm_engine.config.cache_config.block_size
    dev = torch.device("cuda")
    variants = [tuple(int(x) for x in v.split(":")) for v in args.mixed_variants.split(",")]
    shapes = [(d, c) for d in map(int, args.decodes.split(",")) for c in map(int, args.chunks.split(","))]
    rows = {}
    for vi, (splits, qtile) in enumerate(variants):
        graphs.mixed_kv_splits, graphs.mixed_query_tile = splits, (qtile or None)
        if vi:
            graphs.capture()
        for num_dec, chunk in shapes:
            ids, pos, slots, qsl, lens, tables = [], [], [], [0], [], []
            next_block = 0
            for ctx, q in [(args.context, 1)] * num_dec + ([(0, chunk)] if chunk else []):
                n = -(-(ctx + q) // block)
                table = list(range(next_block, next_block + n))
                next_block += n
                for p in range(ctx, ctx + q):
                    ids.append(1000 + p)
                    pos.append(p)
                    slots.append(table[p // block] * block + p % block)
                qsl.append(qsl[-1] + q)
                lens.append(ctx + q)
                tables.append(table)
            max_q = max(b - a for a, b in zip(qsl, qsl[1:]))
            key = graphs.choose(len(ids), len(lens), max_q)
            row = rows.setdefault((num_dec, chunk), {"tokens": len(ids), "key": key, "graph": []})
            graph_ms = float("nan")
            if key is not None and (vi == 0 or key.mixed):
                inputs = pad_inputs(key, ids, pos, slots, qsl, lens, tables, pin=True)
                graph_ms = _time(lambda: graphs.run(key, inputs))
            row["graph"].append(graph_ms)
            if vi:
                continue
            width = max(len(t) for t in tables)
            md = AttentionMetadata(
                num_tokens=len(ids), max_query_len=max_q, max_seq_len=max(lens),
                query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                          dtype=torch.int32, device=dev),
                slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                query_start_loc_cpu=qsl, seq_lens_cpu=lens)
            t_ids = torch.tensor(ids, device=dev)
            t_pos = torch.tensor(pos, device=dev)
            with torch.inference_mode():
                row["eager"] = _time(lambda: runner.model(t_ids, t_pos, runner.kv_caches, md))
    heads = " | ".join(f"graph ms (mixed: splits {s}, q tile {q or 'T'})" for s, q in variants)
    print(f"| decodes | chunk | tokens | graph | {heads} | eager ms |")
    print("|---" * (5 + len(variants)) + "|")
    for (num_dec, chunk), row in rows.items():
        key = row["key"]
        label = "-" if key is None else f"{'mixed' if key.mixed else 'decode'} {key.num_tokens}"
        cells = " | ".join("-" if g != g else f"{g:.2f}" for g in row["graph"])
        print(f"| {num_dec} | {chunk} | {row['tokens']} | {label} | {cells} | {row['eager']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
