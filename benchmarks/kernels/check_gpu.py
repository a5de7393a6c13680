"""Every Triton kernel against its plain-torch reference on the GPU, at model-sized shapes.

    python benchmarks/kernels/check_gpu.py [--dtypes bf16,fp16]

Prints one line per check (max abs error, allowed tolerance) and exits 1 if any
check fails. The CPU test suite runs the same kernels through Triton's
interpreter at tiny shapes; this script is the compiled-code twin for a GPU lease
(tests/kernels also run their large sweeps when a GPU is present).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from kvflow.kernels import ref
from kvflow.kernels.activation import silu_and_mul
from kvflow.kernels.paged_attention import choose_num_kv_splits, paged_attention
from kvflow.kernels.reshape_and_cache import write_kv_cache
from kvflow.kernels.rms_norm import fused_add_rms_norm, rms_norm
from kvflow.kernels.rotary import apply_rotary

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Kernel vs float32 reference; elementwise kernels vs same-dtype reference (one ulp).
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
ULP_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}

failures: list[str] = []


def report(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float, *, exact: bool = False) -> None:
    got, expected = got.float(), expected.float()
    finite = bool(torch.isfinite(got).all())
    err = (got - expected).abs()
    max_err = float(err.max()) if err.numel() else 0.0
    if exact:
        ok = finite and torch.equal(got, expected)
    else:
        ok = finite and bool((err <= tol + tol * expected.abs()).all())
    status = "ok" if ok else "FAIL"
    print(f"{status:4s}  {name:70s} max|err| {max_err:.2e}  tol {'exact' if exact else f'{tol:.0e}'}")
    if not ok:
        failures.append(name)


def paged_inputs(q_lens, seq_lens, heads, head_size, dtype, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(pages) + 1
    kv_cache = torch.randn(2, num_blocks, block_size, heads[1], head_size, generator=gen).to(dtype).cuda()
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = torch.full((len(seq_lens), max(pages) + 1), int(perm[-1]), dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        block_tables[b, :n] = perm[start:start + n]
        start += n
    q = torch.randn(sum(q_lens), heads[0], head_size, generator=gen).to(dtype).cuda()
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32).cuda()
    return dict(q=q, kv_cache=kv_cache, query_start_loc=query_start_loc,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32).cuda(),
                block_tables=block_tables.cuda(), max_query_len=max(q_lens), max_seq_len=max(seq_lens))


def check_attention(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    decode_lens = [1, 15, 16, 17, 4095, 4096, 4097] + torch.randint(1, 8192, (57,), generator=gen).tolist()
    cases = [  # (name, q_lens, seq_lens, (H, Hkv), D, extra kwargs)
        ("decode B=64 GQA 32/8 D128", [1] * 64, decode_lens, (32, 8), 128, {}),
        ("decode B=64 GQA 32/8 D128 splits=7", [1] * 64, decode_lens, (32, 8), 128, dict(num_kv_splits=7)),
        ("decode B=2 ctx 32k auto split", [1, 1], [32768, 20001], (32, 8), 128, {}),
        ("decode B=8 MQA 16/1 D128", [1] * 8, decode_lens[-8:], (16, 1), 128, {}),
        ("decode B=16 GQA 16/2 D256", [1] * 16, decode_lens[-16:], (16, 2), 256, {}),
        ("decode B=16 MHA 12/12 D64", [1] * 16, decode_lens[-16:], (12, 12), 64, {}),
        ("decode B=16 GQA 28/4 (G=7) D128", [1] * 16, decode_lens[-16:], (28, 4), 128, {}),
        ("prefill 1 x 4096 GQA 32/8", [4096], [4096], (32, 8), 128, {}),
        ("mixed: 20 decodes + chunks", [1] * 20 + [1000, 513, 2048, 64, 7],
         [300 + 97 * i for i in range(20)] + [1000, 3000, 2048, 4160, 9], (32, 8), 128, {}),
        ("mixed D256 GQA 16/2", [1] * 4 + [700, 33], [900, 17, 16, 2000, 700, 1500], (16, 2), 256, {}),
        ("mixed D64 GQA 32/4", [1] * 4 + [700, 33], [900, 17, 16, 2000, 700, 1500], (32, 4), 64, {}),
        ("mixed sliding window 1000", [1] * 4 + [1500, 33], [900, 17, 3000, 2000, 1500, 1500], (32, 8), 128,
         dict(sliding_window=1000)),
        ("decode sliding window 4096 split 5", [1] * 8, decode_lens[:8], (32, 8), 128,
         dict(sliding_window=4096, num_kv_splits=5)),
        ("mixed ALiBi", [1] * 4 + [700, 33], [900, 17, 16, 2000, 700, 1500], (16, 16), 128, dict(alibi=True)),
        ("mixed ALiBi + window 333", [1] * 4 + [700, 33], [900, 17, 16, 2000, 700, 1500], (16, 4), 128,
         dict(alibi=True, sliding_window=333)),
    ]
    for name, q_lens, seq_lens, heads, head_size, extra in cases:
        assert len(q_lens) == len(seq_lens), name
        extra = dict(extra)
        inputs = paged_inputs(q_lens, seq_lens, heads, head_size, dtype)
        slopes = None
        if extra.pop("alibi", False):
            slopes = torch.tensor([2.0 ** -(8 * (i + 1) / heads[0]) for i in range(heads[0])], device="cuda")
        common = dict(scale=head_size ** -0.5, max_query_len=inputs["max_query_len"],
                      max_seq_len=inputs["max_seq_len"], sliding_window=extra.pop("sliding_window", None),
                      alibi_slopes=slopes)
        args = [inputs[k] for k in ("q", "kv_cache", "query_start_loc", "seq_lens", "block_tables")]
        if name.endswith("auto split"):
            splits = choose_num_kv_splits(2, heads[1], 1, inputs["max_seq_len"], args[0].device)
            name += f" ({splits} splits)"
        out = paged_attention(*args, **common, **extra)
        args[0], args[1] = args[0].float(), args[1].float()
        expected = ref.paged_attention(*args, **common)
        report(f"paged_attention {name}", out, expected, ATTN_TOL[dtype])


def check_write_kv_cache(dtype: torch.dtype) -> None:
    for tokens, kv_heads, head_size, block_size in [(4099, 8, 128, 16), (1000, 2, 256, 32), (513, 32, 64, 16)]:
        qkv = torch.randn(tokens, 3 * kv_heads, head_size, device="cuda").to(dtype)
        k, v = qkv[:, kv_heads:2 * kv_heads], qkv[:, 2 * kv_heads:]
        num_blocks = tokens // block_size + 8
        cache = torch.randn(2, num_blocks, block_size, kv_heads, head_size, device="cuda").to(dtype)
        slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
        slots[::7] = -1  # padding tokens
        expected = cache.clone()
        ref.write_kv_cache(k, v, expected, slots)
        write_kv_cache(k, v, cache, slots)
        report(f"write_kv_cache T={tokens} Hkv={kv_heads} D={head_size} S={block_size}", cache, expected, 0,
               exact=True)


def check_elementwise(dtype: torch.dtype) -> None:
    tol = ULP_TOL[dtype]
    for tokens, hidden in [(4096, 4096), (3, 8192), (77, 5120)]:
        x = torch.randn(tokens, hidden, device="cuda").to(dtype)
        residual = torch.randn_like(x)
        weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
        report(f"rms_norm [{tokens}, {hidden}]", rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6), tol)
        out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
        expected_out, expected_residual = ref.fused_add_rms_norm(x, residual, weight, 1e-5)
        report(f"fused_add_rms_norm out [{tokens}, {hidden}]", out, expected_out, tol)
        report(f"fused_add_rms_norm residual [{tokens}, {hidden}]", new_residual, expected_residual, 0, exact=True)

    for tokens, heads, kv_heads, head_size, rotary_dim in [(4096, 32, 8, 128, 128), (1000, 16, 2, 256, 64),
                                                           (777, 12, 12, 80, 20)]:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
        freqs = torch.outer(torch.arange(8192, dtype=torch.float32), inv_freq)
        cache = torch.cat([freqs.cos(), freqs.sin()], -1).cuda()
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        for is_neox in (True, False):
            qkv = torch.randn(tokens, heads + 2 * kv_heads, head_size, device="cuda").to(dtype)
            q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
            q_ref, k_ref = q.clone(), k.clone()
            ref.apply_rotary(q_ref, k_ref, positions, cache, is_neox=is_neox)
            apply_rotary(q, k, positions, cache, is_neox=is_neox)
            style = "neox" if is_neox else "gptj"
            report(f"apply_rotary {style} q T={tokens} H={heads} D={head_size} R={rotary_dim}", q, q_ref, tol)
            report(f"apply_rotary {style} k T={tokens} Hkv={kv_heads} D={head_size} R={rotary_dim}", k, k_ref, tol)

    for tokens, inter in [(4096, 14336), (1, 28672), (333, 1000)]:
        x = (torch.randn(tokens, 2 * inter, device="cuda") * 3).to(dtype)
        report(f"silu_and_mul [{tokens}, {2 * inter}]", silu_and_mul(x), ref.silu_and_mul(x), tol)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16, fp32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("check_gpu needs a CUDA GPU.")
    import triton
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    started = time.time()
    torch.manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        print(f"\n## {dtype_name}")
        for check in (check_write_kv_cache, check_attention, check_elementwise):
            try:
                check(dtype)
            except Exception:  # a crash is a failure too; keep checking the rest
                traceback.print_exc()
                failures.append(f"{check.__name__} {dtype_name} crashed")
    print(f"\n{len(failures)} failure(s) in {time.time() - started:.0f} s")
    for name in failures:
        print(f"  FAIL {name}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
