"""The one-token AWQ GEMV over AutoAWQ's own layout (``kernels/awq_gemv_rows``), against
float32 torch on the exactly dequantized weight (interpreter on CPU, GPU when present).

Shape letters: K = input features, N = output features, G = group size.
"""

from __future__ import annotations

import pytest
import torch

from awq_checkpoints import loaded_gate_up_layer
from kvflow.kernels import awq_gemv_rows as kernels
from kvflow.layers import linear as linear_layers
from kvflow.quantization import awq_format
from kvflow.quantization.awq import AWQConfig, AWQLinearMethod

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # of max |reference|: one rounding
Cfg = kernels.AWQGemvRowsConfig


def _packed(num_in: int, num_out: int, group: int | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    packed = awq_format.quantize(torch.randn(num_out, num_in, generator=gen), group)
    return tuple(t.to(DEVICE) for t in packed)


def _check(num_in, num_out, group, config, dtype=torch.float16, bias=False, seed=0):
    qweight, qzeros, scales = _packed(num_in, num_out, group, seed)
    weight = awq_format.dequantize(qweight, qzeros, scales, torch.float32)  # [N, K], exact
    gen = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(1, num_in, generator=gen) * 3).to(dtype).to(DEVICE)
    b = torch.randn(num_out, generator=gen).to(dtype).to(DEVICE) if bias else None
    expected = x.float() @ weight.t() + (b.float() if bias else 0)
    got = kernels.awq_gemv_rows(x, qweight, qzeros, kernels.nibble_major_scales(scales),
                                group or num_in, b, config)
    assert got.shape == (1, num_out) and got.dtype == dtype
    err = (got.float() - expected).abs().max()
    assert err <= TOL[dtype] * expected.abs().max(), float(err)


def test_scales_by_nibble_follow_awq_order():
    scales = torch.arange(2 * 16, dtype=torch.float16).reshape(2, 16)  # [K/G, N]
    by_nibble = kernels.nibble_major_scales(scales)  # [K/G, 8, N/8]
    assert by_nibble.shape == (2, 8, 2)
    for g in range(2):
        for nibble, column in enumerate(awq_format.AWQ_ORDER):
            for word in range(2):
                assert by_nibble[g, nibble, word] == scales[g, 8 * word + column]


# (K, N, G, config): every group size and one group over K; N not a multiple of the
# column tile; 1, 2 and 4 words a thread; one and several warps; splits that leave the
# last one short; chunks smaller than the group; N a whole number of tiles.
CASES = [
    (256, 48, 32, Cfg(words=1, rows=8, warps=4, split_k=1)),
    (512, 520, 128, Cfg(words=2, rows=4, warps=2, split_k=3)),
    (384, 1024 + 64, 64, Cfg(words=4, rows=8, warps=4, split_k=2)),
    (384, 40, None, Cfg(words=1, rows=16, warps=2, split_k=1)),
    (640, 256, 128, Cfg(words=1, rows=4, warps=2, split_k=4, chunk=32)),
    (256, 1024, 64, Cfg(words=4, rows=4, warps=2, split_k=2)),  # N/8 = 32 T: no masks
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype):
    num_in, num_out, group, config = case
    _check(num_in, num_out, group, config, dtype)


@pytest.mark.parametrize("split", [1, 2])
def test_bias_with_and_without_split(split):
    _check(512, 128, 64, Cfg(words=2, rows=8, warps=2, split_k=split), bias=True, seed=3)


def test_every_code_and_zero_at_every_nibble():
    # Codes and zeros 0..15 at each of the eight nibbles of a word (every class and shift,
    # the sign bit included), with a single x = 1: the output is the weight column.
    num_in, num_out, group = 32, 128, 32
    codes = (torch.arange(num_in)[:, None] + torch.arange(num_out)[None, :]) % 16  # [K, N]
    zeros = torch.arange(num_out)[None, :] % 16  # [1, N]
    scales = torch.full((1, num_out), 0.5, dtype=torch.float16)
    qweight, qzeros = awq_format.pack(codes), awq_format.pack(zeros)
    weight = awq_format.dequantize(qweight, qzeros, scales, torch.float32)  # [N, K]
    by_nibble = kernels.nibble_major_scales(scales)
    for row in (0, 5, 31):
        x = torch.zeros(1, num_in, dtype=torch.float16)
        x[0, row] = 1.0
        got = kernels.awq_gemv_rows(x.to(DEVICE), qweight.to(DEVICE), qzeros.to(DEVICE),
                                    by_nibble.to(DEVICE), group,
                                    config=Cfg(words=1, rows=4, warps=2, split_k=1, chunk=32))
        assert torch.equal(got.cpu().float(), weight[:, row][None, :])


def test_default_tile_and_unsupported_shapes():
    cfg = kernels.default_rows_config(12288, 4096, 128)
    assert cfg.split_k >= 1 and 4096 // cfg.split_k >= 1024
    assert kernels.rows_unsupported_reason(4096, 4096, 128) is None
    assert "chunk" in kernels.rows_unsupported_reason(40, 64, 40)  # K = G = 40: no 32-row step
    assert "multiple of 8" in kernels.rows_unsupported_reason(256, 20, 128)


def test_linear_method_rows_runs_one_token(monkeypatch):
    """kernel="rows": the loaded layer keeps AutoAWQ's tensors plus its scales by nibble;
    one token runs the rows kernel, two the exact AWQ path; both match the weight."""
    monkeypatch.setattr(linear_layers, "get_tp_size", lambda: 1)
    monkeypatch.setattr(linear_layers, "get_tp_rank", lambda: 0)
    hidden, inter, group = 128, 96, 32
    gen = torch.Generator().manual_seed(11)
    method = AWQLinearMethod(AWQConfig(group_size=group), kernel="rows")
    layer = loaded_gate_up_layer(method, hidden, inter, group, gen, DEVICE)
    assert layer.scales_by_nibble is not None
    assert layer.kpack is None and layer.int4pack is None and layer.dequantized_weight is None
    exact = awq_format.dequantize(layer.qweight, layer.qzeros, layer.scales)  # [N, K]
    calls = []
    real = kernels.awq_gemv_rows
    monkeypatch.setattr(kernels, "awq_gemv_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    for num_tokens, uses_rows in ((1, True), (2, False)):
        calls.clear()
        x = torch.randn(num_tokens, hidden, generator=gen).to(torch.float16).to(DEVICE)
        reference = x.float() @ exact.t()
        got = method.apply(layer, x)
        assert bool(calls) == uses_rows
        assert got.dtype == torch.float16 and got.shape == (num_tokens, 2 * inter)
        assert (got.float() - reference).abs().max() <= 2e-3 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gated_input_is_silu_and_mul_fused(dtype):
    # x = [gate | up]; the kernel must equal silu_and_mul (rounded as it rounds) then the
    # matmul, i.e. the unfused path, to one rounding of the output.
    from kvflow.kernels.ref import silu_and_mul

    num_in, num_out, group = 384, 256, 64
    qweight, qzeros, scales = _packed(num_in, num_out, group, seed=9)
    weight = awq_format.dequantize(qweight, qzeros, scales, torch.float32)
    gen = torch.Generator().manual_seed(10)
    gate_up = (torch.randn(1, 2 * num_in, generator=gen) * 2).to(dtype).to(DEVICE)
    expected = silu_and_mul(gate_up).float() @ weight.t()
    got = kernels.awq_gemv_rows(gate_up, qweight, qzeros, kernels.nibble_major_scales(scales),
                                group, config=Cfg(words=2, rows=4, warps=2, split_k=2),
                                gated=True)
    assert got.shape == (1, num_out)
    assert (got.float() - expected).abs().max() <= TOL[dtype] * expected.abs().max()


def test_row_parallel_forward_silu_mul(monkeypatch):
    """RowParallelLinear.forward_silu_mul: the rows method fuses one token (bias added
    after, as forward does) and declines two; the plain method always declines."""
    from kvflow.kernels.ref import silu_and_mul

    monkeypatch.setattr(linear_layers, "get_tp_size", lambda: 1)
    monkeypatch.setattr(linear_layers, "get_tp_rank", lambda: 0)
    inter, hidden, group = 128, 64, 32
    gen = torch.Generator().manual_seed(13)
    method = AWQLinearMethod(AWQConfig(group_size=group), kernel="rows")
    layer = linear_layers.RowParallelLinear(inter, hidden, bias=True, linear_method=method,
                                            dtype=torch.float16)
    for name, tensor in zip(("qweight", "qzeros", "scales"),
                            awq_format.quantize(torch.randn(hidden, inter, generator=gen), group)):
        layer.weight_loader(getattr(layer, name), tensor, None)
    layer.weight_loader(layer.bias, torch.randn(hidden, generator=gen).half(), None)
    layer.to(DEVICE)
    method.process_weights_after_loading(layer)
    one = torch.randn(1, 2 * inter, generator=gen).half().to(DEVICE)
    fused = layer.forward_silu_mul(one)
    unfused = layer(silu_and_mul(one))
    assert fused is not None
    assert (fused.float() - unfused.float()).abs().max() <= 2e-3 * unfused.abs().max()
    assert layer.forward_silu_mul(torch.randn(2, 2 * inter).half().to(DEVICE)) is None
    plain = linear_layers.RowParallelLinear(inter, hidden, dtype=torch.float16).to(DEVICE)
    assert plain.forward_silu_mul(one) is None
