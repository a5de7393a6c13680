"""The K-packed AWQ layout (``awq_kpack``) and its Triton GEMV (``kernels/awq_gemv``),
against the plain-torch reference (interpreter on CPU, GPU when present).

Shape letters: M = tokens, K = input features, N = output features, G = group size.
"""

from __future__ import annotations

import pytest
import torch

from awq_checkpoints import loaded_gate_up_layer
from kvflow.kernels import awq_gemv as kernels
from kvflow.layers import linear as linear_layers
from kvflow.quantization import awq_format, awq_kpack
from kvflow.quantization.awq import AWQConfig, AWQLinearMethod

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# (K, N, G): every group size, one group over K (also K not a power of two), N not a
# multiple of the row tile.
SHAPES = [(256, 48, 32), (512, 64, 128), (384, 40, None), (192, 24, 64)]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # of max |reference|: one rounding


def _packed(num_in: int, num_out: int, group: int | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return awq_format.quantize(torch.randn(num_out, num_in, generator=gen), group)


def test_words_round_trip_every_code_at_every_position():
    # Each code 0..15 at each of the eight positions, so every bit of every nibble
    # (the wrapped one included) is exercised.
    codes = torch.arange(16).repeat_interleave(8).reshape(16, 8)  # [16 rows, 8 positions]
    codes = torch.cat([codes, codes.flip(0)], dim=1)  # [16, 16]: two words a row
    words = awq_kpack.pack_words(codes)
    assert words.dtype == torch.int32 and words.shape == (16, 2)
    assert torch.equal(awq_kpack.unpack_words(words), codes.to(torch.int32))
    assert int(awq_kpack.pack_words(torch.full((1, 8), 15))[0, 0]) == -1  # all 32 bits


@pytest.mark.parametrize("shape", SHAPES)
def test_conversion_is_exact(shape):
    num_in, num_out, group = shape
    packed = _packed(num_in, num_out, group)
    kp = awq_kpack.convert_awq(*packed)
    assert kp.words.shape == (num_out, num_in // 8)
    assert kp.group_size == (group or num_in)
    assert kp.scales_zeros.shape == (num_out, num_in // kp.group_size, 2)
    assert torch.equal(awq_kpack.dequantize_kpack(kp), awq_format.dequantize(*packed))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_reference(shape, dtype):
    num_in, num_out, group = shape
    kp = awq_kpack.convert_awq(*(t.to(DEVICE) for t in _packed(num_in, num_out, group)))
    weight = awq_kpack.dequantize_kpack(kp)  # [N, K] float32, exact
    gen = torch.Generator().manual_seed(num_in)
    for num_tokens in (1, 3, 4):
        x = torch.randn(num_tokens, num_in, generator=gen).to(dtype).to(DEVICE)
        expected = x.float() @ weight.t()
        got = kernels.awq_gemv(x, kp.words, kp.scales_zeros, kp.group_size)
        assert got.shape == (num_tokens, num_out) and got.dtype == dtype
        err = (got.float() - expected).abs().max()
        assert err <= TOL[dtype] * expected.abs().max(), (num_tokens, float(err))


@pytest.mark.parametrize("config", [
    kernels.AWQGemvConfig(block_n=16, block_k=128, split_k=2, num_warps=4, num_stages=2),
    kernels.AWQGemvConfig(block_n=8, block_k=256, split_k=4, num_warps=2, num_stages=1),
    # The short-K regime of bench_awq_gemv's sweep: one step a program, 8 splits summed.
    kernels.AWQGemvConfig(block_n=32, block_k=128, split_k=32, num_warps=4, num_stages=1),
])
def test_gemv_splits_and_bias(config):
    num_in, num_out, group = 1024, 72, 64
    kp = awq_kpack.convert_awq(*(t.to(DEVICE) for t in _packed(num_in, num_out, group, seed=5)))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, num_in, generator=gen).to(torch.float16).to(DEVICE)
    bias = torch.randn(num_out, generator=gen).to(torch.float16).to(DEVICE)
    expected = awq_kpack.kpack_linear_ref(x, kp, bias).float()
    got = kernels.awq_gemv(x, kp.words, kp.scales_zeros, kp.group_size, bias, config)
    assert (got.float() - expected).abs().max() <= TOL[torch.float16] * expected.abs().max()


@pytest.mark.parametrize("num_in, num_out, expect", [
    (1024, 256, (64, 128, 8, 1)),  # K >= 2N (down): 64 rows, one 128-input step, 8 splits
    (256, 1024, (64, 256, 1, 3)),  # N >= 4K (gate_up): 64 rows x 256 inputs, no split
    (256, 768, (128, 128, 4, 1)),  # 2K <= N < 4K (MHA qkv): 128 rows x 128 inputs, 4 splits
    (512, 384, (16, 512, 1, 3)),  # the rest: the general tile
])
def test_default_one_token_tiles_by_shape(num_in, num_out, expect):
    # The measured tiles (runs 36, 38) are picked by shape at one token and give the reference.
    cfg = kernels.default_gemv_config(1, num_out, num_in, 64, torch.device(DEVICE))
    assert (cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_stages) == expect
    assert kernels.default_gemv_config(2, num_out, num_in, 64, torch.device(DEVICE)).block_n == 16
    kp = awq_kpack.convert_awq(*(t.to(DEVICE) for t in _packed(num_in, num_out, 64, seed=3)))
    x = torch.randn(1, num_in, generator=torch.Generator().manual_seed(4))
    x = x.to(torch.float16).to(DEVICE)
    expected = awq_kpack.kpack_linear_ref(x, kp).float()
    got = kernels.awq_gemv(x, kp.words, kp.scales_zeros, kp.group_size)
    assert (got.float() - expected).abs().max() <= TOL[torch.float16] * expected.abs().max()


def test_gemv_rejects_bad_inputs():
    kp = awq_kpack.convert_awq(*(t.to(DEVICE) for t in _packed(128, 16, 32)))
    x = torch.randn(5, 128).to(torch.float16).to(DEVICE)
    with pytest.raises(AssertionError, match="1..4 tokens"):
        kernels.awq_gemv(x, kp.words, kp.scales_zeros, kp.group_size)
    with pytest.raises(AssertionError, match="fp16/bf16"):
        kernels.awq_gemv(x[:1].float(), kp.words, kp.scales_zeros, kp.group_size)


def test_linear_method_takes_the_gemv_for_small_batches(monkeypatch):
    """kernel="gemv" repacks the loaded layer; up to max_gemv_tokens tokens run the
    GEMV, more the exact AWQ path; the result matches the dequantized weight."""
    monkeypatch.setattr(linear_layers, "get_tp_size", lambda: 1)
    monkeypatch.setattr(linear_layers, "get_tp_rank", lambda: 0)
    hidden, inter, group = 128, 96, 32
    gen = torch.Generator().manual_seed(11)
    method = AWQLinearMethod(AWQConfig(group_size=group), kernel="gemv", max_gemv_tokens=2)
    layer = loaded_gate_up_layer(method, hidden, inter, group, gen, DEVICE)
    assert layer.kpack is not None and layer.int4pack is None
    assert layer.dequantized_weight is None
    exact = awq_format.dequantize(layer.qweight, layer.qzeros, layer.scales)  # [N, K]
    calls = []
    real = kernels.awq_gemv
    monkeypatch.setattr(kernels, "awq_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    for num_tokens, uses_gemv in ((1, True), (2, True), (3, False)):
        calls.clear()
        x = torch.randn(num_tokens, hidden, generator=gen).to(torch.float16).to(DEVICE)
        reference = x.float() @ exact.t()
        got = method.apply(layer, x)
        assert bool(calls) == uses_gemv
        assert got.dtype == torch.float16 and got.shape == (num_tokens, 2 * inter)
        assert (got.float() - reference).abs().max() <= 2e-3 * reference.abs().max()


def test_auto_gives_layers_without_tinygemm_the_gemv_for_one_token():
    """auto: a layer tinygemm took keeps the method's GEMV bound (0: tinygemm); one it
    could not take (float16 models) runs the K-packed GEMV for one token."""
    from kvflow.quantization.awq import AUTO_FALLBACK_GEMV_TOKENS, auto_gemv_tokens

    assert AUTO_FALLBACK_GEMV_TOKENS == 1
    assert auto_gemv_tokens(True, 0) == 0
    assert auto_gemv_tokens(False, 0) == 1
    assert auto_gemv_tokens(False, 4) == 4 and auto_gemv_tokens(True, 4) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel=auto repacks on CUDA only")
@pytest.mark.parametrize("dtype,expect", [(torch.float16, "kpack"), (torch.bfloat16, "int4pack")])
def test_auto_on_cuda_picks_by_dtype(monkeypatch, dtype, expect):
    monkeypatch.setattr(linear_layers, "get_tp_size", lambda: 1)
    monkeypatch.setattr(linear_layers, "get_tp_rank", lambda: 0)
    gen = torch.Generator().manual_seed(12)
    method = AWQLinearMethod(AWQConfig(group_size=128), kernel="auto")
    layer = linear_layers.RowParallelLinear(256, 128, linear_method=method, dtype=dtype)
    for name, tensor in zip(("qweight", "qzeros", "scales"),
                            awq_format.quantize(torch.randn(128, 256, generator=gen), 128)):
        layer.weight_loader(getattr(layer, name), tensor, None)
    layer.to("cuda")
    method.process_weights_after_loading(layer)
    assert (layer.kpack is not None) == (expect == "kpack")
    assert (layer.int4pack is not None) == (expect == "int4pack")
    exact = awq_format.dequantize(layer.qweight, layer.qzeros, layer.scales)
    for num_tokens in (1, 2):
        x = torch.randn(num_tokens, 256, generator=gen).to(dtype).cuda()
        reference = x.float() @ exact.t()
        got = method.apply(layer, x)
        assert (got.float() - reference).abs().max() <= 2e-2 * reference.abs().max()
