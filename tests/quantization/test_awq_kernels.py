"""The Triton AWQ kernels against the plain-torch reference (interpreter on CPU, GPU when present).

Shape letters: M = tokens, K = input features, N = output features, G = group size.
"""

from __future__ import annotations

import pytest
import torch

from kvflow.kernels import awq_gemm as kernels
from kvflow.quantization import awq_format

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# (K, N, G): group sizes 32/64/128 and one group (None); N not a multiple of the tile.
SHAPES = [(64, 48, 32), (96, 64, 32), (80, 40, None), (256, 128, 128), (128, 264, 64)]
TOKENS = [1, 3, 17]
# Relative to the largest reference output: the output is rounded to x's dtype once.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _packed(num_in: int, num_out: int, group: int | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_out, num_in, generator=gen)
    return tuple(t.to(DEVICE) for t in awq_format.quantize(weight, group))


def _rounded(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel's float32 -> dtype conversion gives. Triton's CPU interpreter
    truncates float32 -> bfloat16 instead of rounding to nearest even."""
    if dtype == torch.bfloat16 and not ON_GPU:
        bits = exact.float().contiguous().view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32).to(dtype)
    return exact.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_kernel_is_exact(shape, dtype):
    num_in, num_out, group = shape
    packed = _packed(num_in, num_out, group)
    exact = awq_format.dequantize(*packed, torch.float32)
    got = kernels.awq_dequantize(*packed, dtype)
    assert got.shape == (num_out, num_in) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, _rounded(exact, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_kernel_matches_reference(shape, num_tokens, dtype):
    num_in, num_out, group = shape
    packed = _packed(num_in, num_out, group, seed=num_tokens)
    gen = torch.Generator().manual_seed(100 + num_tokens)
    x = torch.randn(num_tokens, num_in, generator=gen).to(dtype).to(DEVICE)
    # Reference in float32 on the weight rounded as the kernel rounds it.
    weight = _rounded(awq_format.dequantize(*packed, torch.float32), dtype).float()
    expected = x.float() @ weight.t()
    got = kernels.awq_gemm(x, *packed)
    assert got.shape == (num_tokens, num_out) and got.dtype == dtype
    tol = TOL[dtype] * float(expected.abs().max())
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=TOL[dtype])
    # The plain-torch twin agrees too (it rounds to nearest, so compare loosely for bf16).
    twin = awq_format.awq_gemm(x.float(), *packed).to(dtype).float()
    torch.testing.assert_close(got.float(), twin, atol=2 * tol, rtol=2 * TOL[dtype])


def _gemv(block_n: int, block_k: int, split_k: int, **kw) -> kernels.AWQGemmConfig:
    return kernels.AWQGemmConfig(block_m=1, block_n=block_n, block_k=block_k, split_k=split_k,
                                 use_tensor_cores=False, **kw)


@pytest.mark.parametrize("num_tokens,config", [
    (5, kernels.AWQGemmConfig(block_m=16, block_n=16, block_k=32, split_k=1)),
    (5, kernels.AWQGemmConfig(block_m=16, block_n=32, block_k=16, split_k=3)),  # uneven split
    (1, kernels.AWQGemmConfig(block_m=32, block_n=64, block_k=32, split_k=2)),
    (1, _gemv(256, 16, 1, num_warps=1)),
    (1, _gemv(256, 32, 3, num_warps=1)),              # splits of whole groups
    (1, _gemv(512, 8, 8, num_warps=1)),               # splits inside a group, 2 int32 a thread
    (1, _gemv(512, 16, 4, num_warps=2, num_stages=2)),
])
def test_gemm_kernel_tile_configs(num_tokens, config):
    num_in, num_out, group = 128, 72, 32
    packed = _packed(num_in, num_out, group, seed=7)
    x = torch.randn(num_tokens, num_in, generator=torch.Generator().manual_seed(8)).half()
    x = x.to(DEVICE)
    expected = x.float() @ awq_format.dequantize(*packed, torch.float16).float().t()
    got = kernels.awq_gemm(x, *packed, config=config)
    tol = TOL[torch.float16] * float(expected.abs().max())
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 48, 64), (96, 40, None), (256, 264, 128)], ids=str)
def test_gemv_kernel_splits_and_bias(shape, dtype):
    """The one-token kernel against float32 on the exact weight, with and without
    bias, over split counts that cut K into whole groups, parts of groups, and
    (one group over all of K) ranges inside the group; N past one column tile."""
    num_in, num_out, group = shape
    packed = _packed(num_in, num_out, group, seed=num_in)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, num_in, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(num_out, generator=gen).to(dtype).to(DEVICE)
    exact = x.float() @ awq_format.dequantize(*packed, torch.float32).t()
    tol = TOL[dtype] * float(exact.abs().max())
    for split_k in (1, 2, 6):
        config = _gemv(256, 16, split_k, num_warps=1)
        got = kernels.awq_gemm(x, *packed, config=config, bias=bias if split_k != 2 else None)
        expected = exact + (bias.float() if split_k != 2 else 0)
        assert got.shape == (1, num_out) and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


def test_tensor_core_kernel_adds_bias_with_and_without_split():
    packed = _packed(128, 40, 32, seed=10)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 128, generator=gen).half().to(DEVICE)
    bias = torch.randn(40, generator=gen).half().to(DEVICE)
    expected = x.float() @ awq_format.dequantize(*packed, torch.float16).float().t() + bias.float()
    for split_k in (1, 2):
        config = kernels.AWQGemmConfig(block_m=16, block_n=16, block_k=32, split_k=split_k)
        got = kernels.awq_gemm(x, *packed, config=config, bias=bias)
        torch.testing.assert_close(got.float(), expected,
                                   atol=TOL[torch.float16] * float(expected.abs().max()), rtol=0)


def test_default_config_picks_gemv_for_one_token_of_large_weights():
    for n, k, group in ((28672, 4096, 128), (4096, 11008, 11008), (4096, 14336, 64)):
        gemv = kernels.default_gemm_config(1, n, k, group, DEVICE)
        assert not gemv.use_tensor_cores and k % gemv.block_k == 0 and group % gemv.block_k == 0
        assert 1 <= gemv.split_k <= k // (2 * gemv.block_k)
    assert kernels.default_gemm_config(1, 4096, 4096, 128, DEVICE).use_tensor_cores
    for m in (2, 4, 16):
        assert kernels.default_gemm_config(m, 28672, 4096, 128, DEVICE).use_tensor_cores


def test_gemm_kernel_empty_batch_and_strided_rows():
    packed = _packed(64, 48, 32)
    x = torch.randn(0, 64).half().to(DEVICE)
    assert kernels.awq_gemm(x, *packed).shape == (0, 48)
    # Rows with padding between them (a view into a wider buffer) are read in place.
    wide = torch.randn(3, 80, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)
    x = wide[:, :64]
    expected = awq_format.awq_gemm(x.float(), *packed)
    torch.testing.assert_close(kernels.awq_gemm(x, *packed).float(), expected,
                               atol=2e-3 * float(expected.abs().max()), rtol=2e-3)


def test_launchers_reject_bad_inputs():
    qweight, qzeros, scales = _packed(64, 48, 32)
    with pytest.raises(AssertionError, match="fp16/bf16"):
        kernels.awq_gemm(torch.randn(2, 64, device=DEVICE), qweight, qzeros, scales)
    with pytest.raises(AssertionError, match="must be \\[M, K=64\\]"):
        kernels.awq_gemm(torch.randn(2, 32, device=DEVICE).half(), qweight, qzeros, scales)
    with pytest.raises(AssertionError, match="qzeros"):
        kernels.awq_dequantize(qweight, qzeros[:1], scales)
    x = torch.randn(2, 64, device=DEVICE).half()
    with pytest.raises(AssertionError, match="block_k"):
        kernels.awq_gemm(x, qweight, qzeros, scales,
                         config=kernels.AWQGemmConfig(block_m=16, block_n=32, block_k=64))
    with pytest.raises(AssertionError, match="runs one token"):
        kernels.awq_gemm(x, qweight, qzeros, scales, config=_gemv(256, 32, 1, num_warps=1))
    with pytest.raises(AssertionError, match="256 \\* num_warps"):
        kernels.awq_gemm(x[:1], qweight, qzeros, scales, config=_gemv(128, 32, 1, num_warps=1))
