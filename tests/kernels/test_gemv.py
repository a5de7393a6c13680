"""The small-batch Triton GEMV against float32 torch (interpreter on CPU, GPU when present).

Shape letters: M = tokens, K = input features, N = output features.
"""

from __future__ import annotations

import pytest
import torch

from kvflow.kernels import gemv as kernels
from kvflow.kernels import ref
from kvflow.kernels.gemv import GemvConfig

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Of the largest |reference| output. The kernel sums in float32 and rounds once to the
# output dtype, so its error is that rounding: 2^-9 of the value for bf16 (2^-8 when the
# CPU interpreter truncates instead of rounding), 2^-12 for fp16; float32 differs from
# torch only in summation order (~K * 2^-24 relative to the sum of |terms|).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (N, K): N and K below, at and past a block; K not a multiple of 8 or 16.
SHAPES = [(1, 16), (40, 300), (17, 64), (33, 1000), (130, 257)]


def _inputs(num_tokens: int, num_out: int, num_in: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, num_in, generator=gen).to(dtype).to(DEVICE)
    weight = torch.randn(num_out, num_in, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(num_out, generator=gen).to(dtype).to(DEVICE)
    return x, weight, bias


def _assert_matches(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> None:
    expected = x.float() @ weight.float().t() + (0 if bias is None else bias.float())
    assert got.shape == expected.shape and got.dtype == x.dtype
    tol = TOL[x.dtype] * float(expected.abs().max())
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gemv_default_config_matches_reference(shape, num_tokens, dtype):
    num_out, num_in = shape
    x, weight, bias = _inputs(num_tokens, num_out, num_in, dtype, seed=num_out + num_tokens)
    with_bias = bias if num_out % 2 else None  # both kinds across the shapes
    got = kernels.gemv(x, weight, with_bias)
    _assert_matches(got, x, weight, with_bias)
    # The plain-torch twin rounds the same float32 result once.
    torch.testing.assert_close(got.float(), ref.gemv(x, weight, with_bias).float(),
                               atol=2 * TOL[dtype] * float(got.float().abs().max()), rtol=0)


@pytest.mark.parametrize("num_tokens,config", [
    (1, GemvConfig(block_n=8, block_k=64, split_k=1)),
    (1, GemvConfig(block_n=16, block_k=32, split_k=3, num_stages=2)),  # uneven K split
    (1, GemvConfig(block_n=4, block_k=128, split_k=8, num_warps=1)),   # more splits than steps
    (1, GemvConfig(block_n=32, block_k=64, split_k=2, use_dot=True)),
    (5, GemvConfig(block_n=16, block_k=64, split_k=1, use_dot=True)),
    (7, GemvConfig(block_n=32, block_k=32, split_k=4, use_dot=True)),
    (33, GemvConfig(block_n=64, block_k=128, split_k=2, use_dot=True)),  # 64-row tiles
    (64, GemvConfig(block_n=32, block_k=64, split_k=1, use_dot=True)),   # MAX_TOKENS
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_tile_configs(num_tokens, config, dtype):
    """Split-K on and off, both inner products, blocks that do not divide N or K."""
    x, weight, bias = _inputs(num_tokens, 72, 300, dtype, seed=3)
    _assert_matches(kernels.gemv(x, weight, bias, config=config), x, weight, bias)
    _assert_matches(kernels.gemv(x, weight, None, config=config), x, weight, None)


def test_gemv_strided_rows_and_empty_batch():
    wide = torch.randn(3, 80, generator=torch.Generator().manual_seed(4)).half().to(DEVICE)
    x = wide[:, :64]  # rows with padding between them are read in place
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(5)).half().to(DEVICE)
    _assert_matches(kernels.gemv(x, weight), x, weight, None)
    assert kernels.gemv(x[:0], weight).shape == (0, 24)


def test_gemv_does_not_modify_inputs():
    x, weight, bias = _inputs(2, 40, 96, torch.bfloat16, seed=6)
    before = [t.clone() for t in (x, weight, bias)]
    kernels.gemv(x, weight, bias, config=GemvConfig(16, 32, split_k=3, use_dot=True))
    assert all(torch.equal(a, b) for a, b in zip(before, (x, weight, bias)))


def test_sum_splits_adds_in_order_with_bias():
    partial = torch.randn(3, 2, 10, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    bias = torch.randn(10, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    out = torch.empty(2, 10, device=DEVICE)
    kernels.sum_splits(partial, bias, out)
    torch.testing.assert_close(out, partial[0] + partial[1] + partial[2] + bias)


def test_default_config_is_valid_for_every_token_count():
    for m in range(1, kernels.MAX_TOKENS + 1):
        cfg = kernels.default_gemv_config(m, 4096, 14336, torch.bfloat16, DEVICE)
        assert cfg.use_dot == (m > 1)


def test_gemv_rejects_bad_inputs():
    x, weight, _ = _inputs(2, 8, 32, torch.float16)
    with pytest.raises(AssertionError, match="share a float dtype"):
        kernels.gemv(x, weight.float())
    with pytest.raises(AssertionError, match=r"must be \[M, K\]"):
        kernels.gemv(x, weight[:, :16])
    with pytest.raises(AssertionError, match=f"at most {kernels.MAX_TOKENS} tokens"):
        kernels.gemv(torch.randn(kernels.MAX_TOKENS + 1, 32, device=DEVICE).half(), weight)
    with pytest.raises(AssertionError, match="runs one token"):
        kernels.gemv(x, weight, config=GemvConfig(8, 32))
    with pytest.raises(AssertionError, match="bias"):
        kernels.gemv(x, weight, torch.zeros(9, device=DEVICE).half())


def test_split_k_is_deterministic():
    """Split sums are added in split order by a second launch: same bits every call."""
    x, weight, bias = _inputs(3, 72, 300, torch.float16, seed=9)
    config = GemvConfig(block_n=16, block_k=32, split_k=5, use_dot=True)
    first = kernels.gemv(x, weight, bias, config=config)
    assert torch.equal(kernels.gemv(x, weight, bias, config=config), first)


@pytest.mark.parametrize("num_in,block_k,split_k,expected", [
    (4096, 1024, 1, (4096, 1)), (4096, 128, 3, (1408, 3)), (300, 64, 8, (64, 5)),
])
def test_k_split(num_in, block_k, split_k, expected):
    assert kernels.k_split(num_in, block_k, split_k) == expected


@pytest.mark.parametrize("num_tokens,takes_gemv", [(1, True), (8, True), (9, False)])
def test_linear_layers_take_the_gemv_for_few_tokens(monkeypatch, num_tokens, takes_gemv):
    """``kvflow.layers.linear.linear`` (unquantized linears and the LM head) on the GPU
    path, run here under the interpreter by declaring CPU tensors Triton-ready."""
    from kvflow.layers import linear as linear_mod

    calls = []
    real_gemv = kernels.gemv
    monkeypatch.setattr(linear_mod, "use_triton", lambda x: True)
    monkeypatch.setattr(kernels, "gemv", lambda *a, **kw: calls.append(1) or real_gemv(*a, **kw))
    x, weight, bias = _inputs(num_tokens, 24, 64, torch.bfloat16, seed=10)
    x3d = x.reshape(num_tokens, 1, 64)  # [T, 1, K]: leading dims are flattened and restored
    got = linear_mod.linear(x3d, weight, bias)
    assert got.shape == (num_tokens, 1, 24) and bool(calls) == takes_gemv
    _assert_matches(got.reshape(num_tokens, 24), x, weight, bias)
    assert not linear_mod.linear(x.float(), weight.float()).isnan().any()  # float32: F.linear
