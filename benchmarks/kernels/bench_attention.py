"""K1 of BENCHMARKS.md: paged attention kernels against torch SDPA (flash), on one GPU.

    python benchmarks/kernels/bench_attention.py [--quick] [--tune] [--dtype bf16]

Decode: batch 1..256 x context 128..32k, GQA 32/8, head 128, block 16, one new
token per request, in GB/s (K/V + q + out bytes) and as a fraction of the
device-to-device copy bandwidth measured in the same run. Prefill: causal,
varlen (one flat batch), in TFLOP/s next to SDPA flash on the same shapes
unpaged ([B, H, L, D], is_causal). Prints markdown tables; asserts nothing.

Timing: each measured call is captured in a CUDA graph (so Python launch cost is
not counted: a model runs these inside its own graphs), over enough distinct
copies of the inputs ("layers") that they do not sit in L2; median of 5 replays,
min and max printed too. ``--tune`` sweeps the tile configs for each shape and
prints the fastest, to set the defaults in ``choose_config``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kvflow.attention.metadata import longest_first
from kvflow.kernels.paged_attention import (
    PagedAttentionConfig,
    choose_config,
    choose_num_kv_splits,
    graph_num_kv_splits,
    num_sms,
    paged_attention,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128
L2_FLUSH_BYTES = 256 << 20  # several H100 L2s (50 MB)
MAX_LAYERS = 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def time_graph(make_call: Callable[[int], Callable[[], None]], num_layers: int,
               reps: int = 5) -> tuple[float, float, float]:
    """Median/min/max seconds of one call, over num_layers different inputs per replay."""
    calls = [make_call(i) for i in range(num_layers)]
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for call in calls:  # one more warm-up on the capture stream
            call()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / num_layers)
    del graph
    return statistics.median(times), min(times), max(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t, _, _ = time_graph(lambda i: (lambda: dst.copy_(src)), 1, reps=7)
    return 2 * src.numel() / t


def matmul_flops(dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    b = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    t, _, _ = time_graph(lambda i: (lambda: torch.mm(a, b)), 1, reps=5)
    return 2 * 8192 ** 3 / t


def layers_for(bytes_per_layer: int, budget: int) -> int:
    return max(1, min(MAX_LAYERS, math.ceil(L2_FLUSH_BYTES / max(1, bytes_per_layer)),
                      budget // max(1, bytes_per_layer)))


class PagedInputs:
    """A paged cache for B requests with shuffled block tables, as the engine builds it."""

    def __init__(self, q_lens: list[int], seq_lens: list[int], dtype: torch.dtype, block_size: int = 16):
        pages = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(pages)
        self.kv_cache = torch.randn(2, num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE,
                                    dtype=dtype, device="cuda")
        perm = torch.randperm(num_blocks, dtype=torch.int32)
        block_tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
        start = 0
        for b, n in enumerate(pages):
            block_tables[b, :n] = perm[start:start + n]
            start += n
        self.block_tables = block_tables.to("cuda")
        self.q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_SIZE, dtype=dtype, device="cuda")
        self.query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(),
                                            dtype=torch.int32, device="cuda")
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        self.max_query_len, self.max_seq_len = max(q_lens), max(seq_lens)
        self.out = torch.empty_like(self.q)

    def call(self, config: Optional[PagedAttentionConfig] = None,
             num_kv_splits: Optional[int] = None,
             decode_order: Optional[torch.Tensor] = None) -> Callable[[], None]:
        def run():
            paged_attention(self.q, self.kv_cache, self.query_start_loc, self.seq_lens,
                            self.block_tables, scale=HEAD_SIZE ** -0.5,
                            max_query_len=self.max_query_len, max_seq_len=self.max_seq_len,
                            num_kv_splits=num_kv_splits, config=config, out=self.out,
                            decode_order=decode_order)
        return run


def sdpa_call(batch: int, q_len: int, kv_len: int, dtype: torch.dtype, causal: bool):
    """SDPA flash on contiguous [B, H, L, D] tensors; GQA natively if this torch allows it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, NUM_HEADS, q_len, HEAD_SIZE, dtype=dtype, device="cuda")
    k = torch.randn(batch, NUM_KV_HEADS, kv_len, HEAD_SIZE, dtype=dtype, device="cuda")
    v = torch.randn_like(k)

    def gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        gqa()
        return gqa, "flash+gqa"
    except RuntimeError:
        # Flash without native GQA: expand K/V (the expanded bytes are not counted).
        group = NUM_HEADS // NUM_KV_HEADS
        k_x, v_x = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def expanded():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k_x, v_x, is_causal=causal)
        expanded()
        return expanded, "flash, K/V expanded"


def run_sdpa(batch, q_len, kv_len, dtype, causal, num_layers):
    """(timing, kind) of the SDPA peer, or (None, why) if it cannot run here."""
    try:
        sdpa_layers = [sdpa_call(batch, q_len, kv_len, dtype, causal) for _ in range(num_layers)]
        timing = time_graph(lambda i: sdpa_layers[i][0], num_layers)
        kind = sdpa_layers[0][1]
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        timing, kind = None, f"SDPA failed: {type(exc).__name__}"
    sdpa_layers = None
    torch.cuda.empty_cache()
    return timing, kind


def fmt_t(stats) -> str:
    med, lo, hi = stats
    return f"{med * 1e6:.1f} ({lo * 1e6:.1f}-{hi * 1e6:.1f})"


def bench_decode(dtype, batches, contexts, copy_bw, budget, tune: bool) -> None:
    print("\n### Decode (paged, GQA 32/8, head 128, block 16)\n")
    print("| batch | context | splits | kvflow us (min-max) | kvflow GB/s | % copy | SDPA us | SDPA GB/s | SDPA kind |")
    print("|---|---|---|---|---|---|---|---|---|")
    elt = torch.finfo(dtype).bits // 8
    for batch in batches:
        for ctx in contexts:
            kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_SIZE * elt
            if kv_bytes > budget:
                print(f"| {batch} | {ctx} | - | skipped: K/V {kv_bytes / 2**30:.0f} GiB > budget | | | | | |")
                continue
            moved = kv_bytes + 2 * batch * NUM_HEADS * HEAD_SIZE * elt
            num_layers = layers_for(kv_bytes, budget)
            layers = [PagedInputs([1] * batch, [ctx] * batch, dtype) for _ in range(num_layers)]
            splits = choose_num_kv_splits(batch, NUM_KV_HEADS, 1, ctx, layers[0].q.device)
            ours = time_graph(lambda i: layers[i].call(), num_layers)
            best = ""
            if tune:
                best = tune_shape(layers, num_layers, max_query_len=1)
            layers = None
            torch.cuda.empty_cache()
            theirs, kind = run_sdpa(batch, 1, ctx, dtype, False, num_layers)
            peer = f"{fmt_t(theirs)} | {moved / theirs[0] / 1e9:.0f}" if theirs else "- | -"
            print(f"| {batch} | {ctx} | {splits} | {fmt_t(ours)} | {moved / ours[0] / 1e9:.0f} | "
                  f"{100 * moved / ours[0] / copy_bw:.0f}% | {peer} | {kind} |{best}")
            sys.stdout.flush()


def bench_splits(dtype, batches, contexts, split_counts: list[int], copy_bw, budget) -> None:
    """Decode with the split count pinned, as a CUDA graph replays it whatever the context:
    us per call for each count, next to the graphs' choice (``graph_num_kv_splits``)."""
    print(f"\n### Decode by pinned split count (GQA {NUM_HEADS}/{NUM_KV_HEADS}, head {HEAD_SIZE})\n")
    print("| batch | context | graph's splits | " + " | ".join(f"{n} splits us" for n in split_counts)
          + " | best % copy |")
    print("|---|---|---|" + "---|" * (len(split_counts) + 1))
    elt = torch.finfo(dtype).bits // 8
    for batch in batches:
        for ctx in contexts:
            kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_SIZE * elt
            moved = kv_bytes + 2 * batch * NUM_HEADS * HEAD_SIZE * elt
            num_layers = layers_for(kv_bytes, budget)
            layers = [PagedInputs([1] * batch, [ctx] * batch, dtype) for _ in range(num_layers)]
            graph = graph_num_kv_splits(batch, NUM_KV_HEADS, num_sms(layers[0].q.device))
            times = [time_graph(lambda i: layers[i].call(num_kv_splits=n), num_layers)[0]
                     for n in split_counts]
            print(f"| {batch} | {ctx} | {graph} | " + " | ".join(f"{t * 1e6:.1f}" for t in times)
                  + f" | {100 * moved / min(times) / copy_bw:.0f}% |")
            sys.stdout.flush()
            layers = None
            torch.cuda.empty_cache()


def bench_ragged(dtype, batches, lo: int, hi: int, copy_bw, budget) -> None:
    """Decode at context lengths drawn uniformly from [lo, hi] (T1's decode steps: prompts
    100..1,024 plus up to 256 generated): batch order against longest first."""
    import random

    print(f"\n### Decode, ragged contexts uniform in [{lo}, {hi}] (paged, GQA 32/8, head 128)\n")
    print("| batch | mean context | splits | launch order | kvflow us (min-max) | GB/s | % copy |")
    print("|---|---|---|---|---|---|---|")
    elt = torch.finfo(dtype).bits // 8
    for batch in batches:
        rng = random.Random(batch)
        ctx = [rng.randint(lo, hi) for _ in range(batch)]
        kv_bytes = 2 * sum(ctx) * NUM_KV_HEADS * HEAD_SIZE * elt
        moved = kv_bytes + 2 * batch * NUM_HEADS * HEAD_SIZE * elt
        num_layers = layers_for(kv_bytes, budget)
        layers = [PagedInputs([1] * batch, ctx, dtype) for _ in range(num_layers)]
        splits = choose_num_kv_splits(batch, NUM_KV_HEADS, 1, max(ctx), layers[0].q.device)
        order = torch.tensor(longest_first(ctx), dtype=torch.int32, device="cuda")
        for name, dec in (("batch order", None), ("longest first", order)):
            t = time_graph(lambda i: layers[i].call(decode_order=dec), num_layers)
            print(f"| {batch} | {sum(ctx) / batch:.0f} | {splits} | {name} | {fmt_t(t)} | "
                  f"{moved / t[0] / 1e9:.0f} | {100 * moved / t[0] / copy_bw:.0f}% |")
            sys.stdout.flush()
        layers = None
        torch.cuda.empty_cache()


def causal_flops(q_lens: list[int], seq_lens: list[int]) -> float:
    pairs = sum(q * (s - q) + q * (q + 1) / 2 for q, s in zip(q_lens, seq_lens))
    return 4.0 * pairs * NUM_HEADS * HEAD_SIZE


def bench_prefill(dtype, shapes, budget, tune: bool, mm_flops: float) -> None:
    print("\n### Prefill (causal, varlen flat batch, GQA 32/8, head 128)\n")
    print("| shape | tokens | kvflow ms (min-max) | kvflow TFLOP/s | SDPA ms | SDPA TFLOP/s | kvflow / SDPA | SDPA kind |")
    print("|---|---|---|---|---|---|---|---|")
    for name, q_lens, seq_lens, peer in shapes:
        flops = causal_flops(q_lens, seq_lens)
        elt = torch.finfo(dtype).bits // 8
        layer_bytes = 2 * sum(seq_lens) * NUM_KV_HEADS * HEAD_SIZE * elt
        num_layers = min(4, layers_for(layer_bytes, budget))
        layers = [PagedInputs(q_lens, seq_lens, dtype) for _ in range(num_layers)]
        ours = time_graph(lambda i: layers[i].call(), num_layers)
        best = tune_shape(layers, num_layers, max_query_len=max(q_lens)) if tune else ""
        layers = None
        row = f"| {name} | {sum(q_lens)} | {ours[0] * 1e3:.3f} ({ours[1] * 1e3:.3f}-{ours[2] * 1e3:.3f}) | {flops / ours[0] / 1e12:.0f} |"
        torch.cuda.empty_cache()
        theirs = None
        if peer:
            theirs, kind = run_sdpa(peer[0], peer[1], peer[1], dtype, True, num_layers)
        if theirs:
            row += (f" {theirs[0] * 1e3:.3f} | {flops / theirs[0] / 1e12:.0f} | "
                    f"{100 * theirs[0] / ours[0]:.0f}% | {kind} |")
        elif peer:
            row += f" - | - | - | {kind} |"
        else:
            row += " - | - | - | no unpaged peer for this shape |"
        torch.cuda.empty_cache()
        print(row + best)
        sys.stdout.flush()
    print(f"\n(bf16 8192^3 matmul in this run: {mm_flops / 1e12:.0f} TFLOP/s)")


TUNE_CONFIGS = {
    "decode": [PagedAttentionConfig(16, tn, w, s) for tn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)],
    "prefill": [PagedAttentionConfig(bm, tn, w, s) for bm, w in ((64, 4), (128, 4), (128, 8))
                for tn in (32, 64, 128) for s in (2, 3)],
}


TUNE_CANDIDATE = {"decode": PagedAttentionConfig(16, 64, 4, 2),
                  "prefill": PagedAttentionConfig(128, 64, 8, 2)}
"""A config whose time every tuned row also shows, to weigh a change of default."""


def tune_shape(layers, num_layers, max_query_len) -> str:
    """Times every candidate config on these inputs; returns ' best: ...' for the table row."""
    kind = "decode" if max_query_len == 1 else "prefill"
    default = choose_config(max_query_len, NUM_HEADS // NUM_KV_HEADS, HEAD_SIZE)
    results = []
    for config in TUNE_CONFIGS[kind]:
        try:
            t = time_graph(lambda i: layers[i].call(config=config), num_layers, reps=3)[0]
        except Exception as exc:  # e.g. out of shared memory for a large tile
            print(f"<!-- {config}: {type(exc).__name__} -->", file=sys.stderr)
            continue
        results.append((t, config))
    results.sort(key=lambda r: r[0])
    t_default = time_graph(lambda i: layers[i].call(config=default), num_layers, reps=3)[0]
    t_best, best = results[0]
    t_cand = dict((c, t) for t, c in results).get(TUNE_CANDIDATE[kind], float("nan"))
    return (f" best: bm={best.block_m} tn={best.tile_n} w={best.num_warps} s={best.num_stages} "
            f"{t_best * 1e6:.1f} us vs default {t_default * 1e6:.1f} us, candidate "
            f"{t_cand * 1e6:.1f} us")


def main() -> None:
    global NUM_KV_HEADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset that runs in about a minute")
    parser.add_argument("--tune", action="store_true", help="sweep tile configs per shape")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batches", default=None, help="decode batch sizes, comma list")
    parser.add_argument("--contexts", default=None, help="decode context lengths, comma list")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill tables")
    parser.add_argument("--ragged", default=None, metavar="LO-HI",
                        help="instead: decode batches at contexts uniform in [LO, HI], "
                             "batch order against longest first")
    parser.add_argument("--splits", default=None, metavar="N,N,...",
                        help="instead: decode with each split count pinned (as CUDA graphs)")
    parser.add_argument("--kv-heads", type=int, default=NUM_KV_HEADS,
                        help="KV heads (32 query heads): 8 = Llama-3-8B, 32 = Llama-2-7B")
    parser.add_argument("--budget-gib", type=float, default=16.0,
                        help="max K/V bytes of one shape (all its layers)")
    args = parser.parse_args()
    NUM_KV_HEADS = args.kv_heads
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU.")
    dtype = DTYPES[args.dtype]
    budget = int(args.budget_gib * 2**30)
    torch.manual_seed(0)
    started = time.time()

    import triton
    props = torch.cuda.get_device_properties(0)
    print(f"# K1 attention kernels — {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}, {args.dtype}{' (quick)' if args.quick else ''}\n")
    copy_bw = copy_bandwidth()
    mm = matmul_flops(torch.bfloat16)
    print(f"copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s; bf16 matmul 8192^3: {mm / 1e12:.0f} TFLOP/s")

    if args.quick:
        batches, contexts = [1, 16, 128], [512, 4096, 32768]
    else:
        batches, contexts = [1, 4, 16, 64, 256], [128, 512, 2048, 8192, 32768]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else contexts
    if args.splits:
        bench_splits(dtype, batches, contexts, [int(n) for n in args.splits.split(",")],
                     copy_bw, budget)
        return
    if args.ragged:
        lo, hi = (int(v) for v in args.ragged.split("-"))
        bench_ragged(dtype, batches, lo, hi, copy_bw, budget)
        return
    bench_decode(dtype, batches, contexts, copy_bw, budget, args.tune)
    if args.decode_only:
        return

    prefill = [  # (name, q_lens, seq_lens, SDPA peer (B, L) or None)
        ("1 x 8192", [8192], [8192], (1, 8192)),
        ("4 x 2048", [2048] * 4, [2048] * 4, (4, 2048)),
        ("16 x 512", [512] * 16, [512] * 16, (16, 512)),
    ]
    if not args.quick:
        prefill += [
            ("64 x 128", [128] * 64, [128] * 64, (64, 128)),
            ("varlen mix 100..1024 x 16", [100 + 61 * i for i in range(16)], [100 + 61 * i for i in range(16)], None),
            ("chunk 2048 over 6144 cached", [2048], [8192], None),
            ("mixed: chunk 1024 + 127 decodes at 2k", [1024] + [1] * 127, [1024] + [2048] * 127, None),
        ]
    bench_prefill(dtype, prefill, budget, args.tune, mm)
    print(f"\n_total {time.time() - started:.0f} s_")


if __name__ == "__main__":
    main()
