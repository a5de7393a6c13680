"""AWQ -> tinygemm (``torch._weight_int4pack_mm``) conversion, on CPU.

The conversion is checked against kvflow's AWQ reference (``awq_format.dequantize``):
bit for bit where the scales are bfloat16 values tinygemm can hold exactly, within
the bound bfloat16 scales imply otherwise. torch's CPU twin of the op then runs the
packed weight, and ``AWQLinearMethod`` takes that path when told to.

Shape letters: M = tokens, K = input features, N = output features, G = group size.
"""

from __future__ import annotations

import pytest
import torch

from kvflow import envs
from kvflow.layers import linear as linear_layers
from kvflow.quantization import awq_format, awq_int4pack
from kvflow.quantization.awq import AWQConfig, AWQLinearMethod

CPU = torch.device("cpu")
HAS_CPU_OP = awq_int4pack.has_kernel(CPU)
needs_cpu_op = pytest.mark.skipif(not HAS_CPU_OP, reason="torch has no CPU int4pack op")

# (K, N, G): every AWQ group size, one group over K, N not a power of two (a multiple of 16).
SHAPES = [(128, 48, 32), (256, 64, 64), (256, 80, 128), (384, 32, None)]


def _awq_with_exact_scales(num_in: int, num_out: int, group: int | None, seed: int):
    """Random codes and zeros; scales m * 2^-e with m <= 15, so that the scale and
    (8 - z) * scale (at most 4 + 4 significant bits) are exact in bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    num_groups = 1 if group is None else num_in // group
    codes = torch.randint(0, 16, (num_in, num_out), generator=gen)
    zeros = torch.randint(0, 16, (num_groups, num_out), generator=gen)
    mantissa = torch.randint(1, 16, (num_groups, num_out), generator=gen).float()
    exponent = torch.randint(6, 11, (num_groups, num_out), generator=gen).float()
    scales = (mantissa * torch.exp2(-exponent)).to(torch.float16)
    return awq_format.pack(codes), awq_format.pack(zeros), scales


def _tinygemm_group(num_in: int, group: int | None) -> int:
    found = awq_int4pack.tinygemm_group_size(num_in, group)
    assert found is not None
    return found


@pytest.mark.parametrize("shape", SHAPES)
def test_conversion_is_exact_where_bfloat16_holds_the_scales(shape):
    num_in, num_out, group = shape
    qweight, qzeros, scales = _awq_with_exact_scales(num_in, num_out, group, seed=num_in)
    tiny_group = _tinygemm_group(num_in, group)
    codes, scales_and_zeros = awq_int4pack.awq_to_tinygemm(qweight, qzeros, scales, tiny_group)
    assert codes.shape == (num_out, num_in) and codes.dtype == torch.int32
    assert torch.equal(codes, awq_format.unpack(qweight).t())
    assert scales_and_zeros.shape == (num_in // tiny_group, num_out, 2)
    assert scales_and_zeros.dtype == torch.bfloat16
    expected = awq_format.dequantize(qweight, qzeros, scales)  # [N, K] float32
    got = awq_int4pack.dequantize_tinygemm(codes, scales_and_zeros, tiny_group)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_conversion_error_is_bounded_by_bfloat16_scales(shape):
    """Real fp16 scales: |w' - w| <= (|q - z| + 8) * s * 2^-8 (bf16 keeps 8 bits), and
    w' = 0 exactly where q = z = 8 (the zero is built from the rounded scale)."""
    num_in, num_out, group = shape
    gen = torch.Generator().manual_seed(7)
    qweight, qzeros, scales = awq_format.quantize(torch.randn(num_out, num_in, generator=gen),
                                                  group)
    tiny_group = _tinygemm_group(num_in, group)
    codes, scales_and_zeros = awq_int4pack.awq_to_tinygemm(qweight, qzeros, scales, tiny_group)
    expected = awq_format.dequantize(qweight, qzeros, scales)  # [N, K]
    got = awq_int4pack.dequantize_tinygemm(codes, scales_and_zeros, tiny_group)
    awq_group = awq_format.group_size_of(qweight, scales)
    q = awq_format.unpack(qweight).t().float()  # [N, K]
    z = awq_format.unpack(qzeros).repeat_interleave(awq_group, dim=0).t().float()  # [N, K]
    s = scales.float().repeat_interleave(awq_group, dim=0).t()  # [N, K]
    bound = ((q - z).abs() + 8) * s * 2.0**-8
    assert ((got - expected).abs() <= bound).all()
    at_eight = (q == 8) & (z == 8)
    assert at_eight.any() and (got[at_eight] == 0).all()


@needs_cpu_op
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4pack_linear_matches_dequantized_matmul(shape, num_tokens):
    num_in, num_out, group = shape
    gen = torch.Generator().manual_seed(num_tokens)
    packed = awq_format.quantize(torch.randn(num_out, num_in, generator=gen), group)
    weight = awq_int4pack.convert_awq(*packed, group)
    codes, scales_and_zeros = awq_int4pack.awq_to_tinygemm(*packed, weight.group_size)
    dense = awq_int4pack.dequantize_tinygemm(codes, scales_and_zeros, weight.group_size)
    # The kernel reads exactly the weights dequantize_tinygemm describes: x = I gives W.T.
    eye = torch.eye(num_in, dtype=torch.bfloat16)
    assert torch.equal(awq_int4pack.int4pack_linear(eye, weight), dense.t().to(torch.bfloat16))
    x = torch.randn(num_tokens, num_in, generator=gen).to(torch.bfloat16)
    bias = torch.randn(num_out, generator=gen).to(torch.bfloat16)
    got = awq_int4pack.int4pack_linear(x, weight, bias)
    reference = x.float() @ dense.t() + bias.float()
    assert got.dtype == torch.bfloat16 and got.shape == (num_tokens, num_out)
    assert (got.float() - reference).abs().max() <= 1.6e-2 * reference.abs().max()
    # Against the AWQ weights themselves: the bf16-scale error stays small.
    awq_reference = x.float() @ awq_format.dequantize(*packed).t() + bias.float()
    assert (got.float() - awq_reference).abs().max() <= 2e-2 * awq_reference.abs().max()


def test_int4pack_linear_refuses_float16():
    packed = awq_format.quantize(torch.randn(16, 64), 32)
    codes, scales_and_zeros = awq_int4pack.awq_to_tinygemm(*packed, 32)
    weight = awq_int4pack.Int4PackWeight(codes, scales_and_zeros, 32)
    with pytest.raises(ValueError, match="bfloat16 activations"):
        awq_int4pack.int4pack_linear(torch.randn(1, 64, dtype=torch.float16), weight)


def test_unsupported_reasons():
    bf16 = torch.bfloat16
    assert awq_int4pack.unsupported_reason(4096, 6144, 128, bf16, CPU) is None or not HAS_CPU_OP
    assert "bfloat16 only" in awq_int4pack.unsupported_reason(4096, 6144, 128, torch.float16, CPU)
    if HAS_CPU_OP:
        assert "multiple of 16" in awq_int4pack.unsupported_reason(4096, 40, 128, bf16, CPU)
        assert "tinygemm group" in awq_int4pack.unsupported_reason(96, 64, None, bf16, CPU)
    assert awq_int4pack.tinygemm_group_size(4096, None) == 128
    assert awq_int4pack.inner_k_tiles_for(4096) == 8 and awq_int4pack.inner_k_tiles_for(96) == 2


# ------------------------------------------------------------------ the linear method

@needs_cpu_op
@pytest.mark.parametrize("tp_size", [1, 2])
def test_linear_method_takes_int4pack_after_loading_each_shard(monkeypatch, tp_size):
    """kernel="int4pack" repacks each rank's loaded shard; small batches multiply by
    it, large ones by the exact AWQ weights (kept beside the repack)."""
    hidden, inter, group = 128, 256, 32
    gen = torch.Generator().manual_seed(3)
    method = AWQLinearMethod(AWQConfig(group_size=group), kernel="int4pack",
                             max_int4pack_tokens=4)
    gate, up = (awq_format.quantize(torch.randn(inter, hidden, generator=gen), group)
                for _ in range(2))
    down = awq_format.quantize(torch.randn(hidden, inter, generator=gen), group)
    for rank in range(tp_size):
        monkeypatch.setattr(linear_layers, "get_tp_size", lambda: tp_size)
        monkeypatch.setattr(linear_layers, "get_tp_rank", lambda rank=rank: rank)
        gate_up = linear_layers.MergedColumnParallelLinear(
            hidden, [inter, inter], linear_method=method, dtype=torch.bfloat16)
        row = linear_layers.RowParallelLinear(inter, hidden, linear_method=method,
                                              dtype=torch.bfloat16)
        for layer, parts in ((gate_up, [(gate, 0), (up, 1)]), (row, [(down, None)])):
            for packed, shard in parts:
                for name, tensor in zip(("qweight", "qzeros", "scales"), packed):
                    layer.weight_loader(getattr(layer, name), tensor, shard)
            method.process_weights_after_loading(layer)
            assert layer.int4pack is not None and layer.dequantized_weight is None
            exact = awq_format.dequantize(layer.qweight, layer.qzeros, layer.scales)  # [N, K]
            codes, scales_and_zeros = awq_int4pack.awq_to_tinygemm(
                layer.qweight, layer.qzeros, layer.scales, group)
            tiny = awq_int4pack.dequantize_tinygemm(codes, scales_and_zeros, group)
            for num_tokens, weight in ((1, tiny), (4, tiny), (5, exact)):
                x = torch.randn(num_tokens, layer.in_features, generator=gen).to(torch.bfloat16)
                reference = x.float() @ weight.t()
                got = method.apply(layer, x)
                assert got.dtype == torch.bfloat16
                assert (got.float() - reference).abs().max() <= 1.6e-2 * reference.abs().max()
        expected_rows = torch.cat([awq_format.dequantize(*gate).chunk(tp_size)[rank],
                                   awq_format.dequantize(*up).chunk(tp_size)[rank]])
        assert torch.equal(awq_format.dequantize(gate_up.qweight, gate_up.qzeros,
                                                 gate_up.scales), expected_rows)


def test_kernel_choice_and_refusals(monkeypatch):
    monkeypatch.setenv("KVFLOW_AWQ_KERNEL", "Int4Pack")
    assert envs.awq_kernel() == "int4pack"
    monkeypatch.setenv("KVFLOW_AWQ_KERNEL", "")
    assert envs.awq_kernel() == "auto"
    monkeypatch.setenv("KVFLOW_AWQ_KERNEL", "marlin")
    with pytest.raises(ValueError, match="KVFLOW_AWQ_KERNEL='marlin'"):
        envs.awq_kernel()
    with pytest.raises(ValueError, match="not one of"):
        AWQLinearMethod(AWQConfig(group_size=32), kernel="marlin")
    monkeypatch.setattr(linear_layers, "get_tp_size", lambda: 1)
    monkeypatch.setattr(linear_layers, "get_tp_rank", lambda: 0)
    packed = awq_format.quantize(torch.randn(64, 128), 32)
    # auto on CPU: the exact dequantized weight, no repack.
    auto = linear_layers.RowParallelLinear(128, 64, dtype=torch.bfloat16,
                                           linear_method=AWQLinearMethod(AWQConfig(group_size=32)))
    for name, tensor in zip(("qweight", "qzeros", "scales"), packed):
        auto.weight_loader(getattr(auto, name), tensor, None)
    auto.method.process_weights_after_loading(auto)
    assert auto.int4pack is None and auto.dequantized_weight is not None
    # int4pack on a float16 model: refused, naming the knob.
    forced = AWQLinearMethod(AWQConfig(group_size=32), kernel="int4pack")
    half = linear_layers.RowParallelLinear(128, 64, dtype=torch.float16, linear_method=forced)
    for name, tensor in zip(("qweight", "qzeros", "scales"), packed):
        half.weight_loader(getattr(half, name), tensor, None)
    with pytest.raises(ValueError, match="KVFLOW_AWQ_KERNEL=auto or triton"):
        forced.process_weights_after_loading(half)
