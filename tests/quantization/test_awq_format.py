"""AutoAWQ's GEMM layout: packing order, round trips, and exact dequantization."""

from __future__ import annotations

import pytest
import torch

from kvflow.quantization import awq_format

AUTOAWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_by_spec(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing written out literally: nibble i of int32 column c holds
    column 8c + ORDER[i]. Slow on purpose; an independent twin of ``pack``."""
    rows, cols = codes.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for c in range(cols // 8):
            value = 0
            for i, j in enumerate(AUTOAWQ_ORDER):
                value |= int(codes[r, 8 * c + j]) << (4 * i)
            out[r, c] = value - (1 << 32) if value >= 1 << 31 else value
    return out


def test_pack_matches_autoawq_nibble_order():
    # Columns 0..7 hold their own index: nibbles from the top read 7 5 3 1 6 4 2 0.
    codes = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    assert awq_format.pack(codes).item() == 0x75316420
    # Top nibble set: the int32 is negative and must still round-trip.
    codes = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.int32)
    assert awq_format.pack(codes).item() == (15 << 28) - (1 << 32)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 48), generator=gen, dtype=torch.int32)
    assert torch.equal(awq_format.pack(codes), _pack_by_spec(codes))


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (17, 248), (64, 1024)])
def test_pack_unpack_round_trip(shape):
    gen = torch.Generator().manual_seed(shape[1])
    codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.int32)
    packed = awq_format.pack(codes)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    assert torch.equal(awq_format.unpack(packed), codes)
    # Every 32-bit pattern is a valid packing: unpack -> pack is the identity too.
    words = torch.randint(-(2**31), 2**31 - 1, (shape[0], shape[1] // 8), generator=gen,
                          dtype=torch.int64).to(torch.int32)
    assert torch.equal(awq_format.pack(awq_format.unpack(words)), words)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="multiple of 8"):
        awq_format.pack(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match="0..15"):
        awq_format.pack(torch.full((1, 8), 16, dtype=torch.int32))


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_quantize_layout_and_exact_dequantize(group_size):
    num_out, num_in = 48, 256
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(num_out, num_in, generator=gen)
    qweight, qzeros, scales = awq_format.quantize(weight, group_size)
    group = num_in if group_size is None else group_size
    assert qweight.shape == (num_in, num_out // 8) and qweight.dtype == torch.int32
    assert qzeros.shape == (num_in // group, num_out // 8) and qzeros.dtype == torch.int32
    assert scales.shape == (num_in // group, num_out) and scales.dtype == torch.float16

    deq = awq_format.dequantize(qweight, qzeros, scales, torch.float32)
    assert deq.shape == (num_out, num_in) and deq.is_contiguous()
    # Element by element from the definition, in float64: the float32 result is exact.
    codes = awq_format.unpack(qweight).double()  # [K, N]
    zeros = awq_format.unpack(qzeros).double()  # [K/G, N]
    for k in (0, group - 1, group, num_in - 1):
        if k >= num_in:
            continue
        g = k // group
        expected = (codes[k] - zeros[g]) * scales[g].double()
        assert torch.equal(deq[:, k].double(), expected)
    # Round to nearest: within half a step of the original weight, step = scale of its group.
    step = scales.float().t().repeat_interleave(group, dim=1)  # [N, K]
    assert bool(((deq - weight).abs() <= step * 0.5 + 1e-6).all())


def test_dequantize_dtypes_round_once():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    packed = awq_format.quantize(weight, 32)
    exact = awq_format.dequantize(*packed, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(awq_format.dequantize(*packed, dtype), exact.to(dtype))
