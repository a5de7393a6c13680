"""The half2 AWQ layout (``awq_h2pack``) and its one-token Triton GEMV
(``kernels/awq_gemv_h2``), against the plain-torch reference (interpreter on CPU, GPU
when present).

Shape letters: K = input features, N = output features, G = group size, B = blocks of
32 inputs.
"""

from __future__ import annotations

import pytest
import torch

from kvflow.kernels import awq_gemv_h2 as kernels
from kvflow.quantization import awq_format, awq_h2pack

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

TOL = 3e-3  # of max |reference|: fp16 sums of 16 products a half, then float32


def _packed(num_in: int, num_out: int, group: int | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return awq_format.quantize(torch.randn(num_out, num_in, generator=gen), group)


def _h2(num_in: int, num_out: int, group: int | None, seed: int = 0) -> awq_h2pack.H2Weight:
    return awq_h2pack.convert_awq(*(t.to(DEVICE) for t in _packed(num_in, num_out, group, seed)))


def _position(k: int) -> tuple[int, int]:
    """(word index in its row, lowest bit) of input k, as the module docstring says:
    k = 32b + 8j + 2t + h sits in word 4b + t at bits 4j + 16h .. +3."""
    b, r = divmod(k, 32)
    j, r = divmod(r, 8)
    t, h = divmod(r, 2)
    return 4 * b + t, 4 * j + 16 * h


def _signed(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


def test_words_round_trip_every_code_at_every_position():
    # Row r holds code (r + k) % 16 at input k: over the 16 rows every code 0..15 sits at
    # every k of two blocks, i.e. at every word t, pair j and half (every bit, sign included).
    num_in = 64
    codes = (torch.arange(16)[:, None] + torch.arange(num_in)[None, :]) % 16  # [16, K]
    words = awq_h2pack.pack_words(codes)
    assert words.dtype == torch.int32 and words.shape == (16, num_in // 8)
    assert torch.equal(awq_h2pack.unpack_words(words), codes.to(torch.int32))
    for k in range(num_in):
        seen = sorted(int(c) for c in codes[:, k])
        assert seen == list(range(16)), k
    assert torch.equal(awq_h2pack.pack_words(torch.full((2, 32), 15)),
                       torch.full((2, 4), -1, dtype=torch.int32))  # all 32 bits
    assert torch.equal(awq_h2pack.pack_words(torch.zeros(2, 32, dtype=torch.int32)),
                       torch.zeros(2, 4, dtype=torch.int32))


def test_words_bit_layout_by_hand():
    # One row per input k of two blocks, that row's only nonzero code at k: exactly one
    # word of the row is nonzero and it holds the code at the docstring's bits. Codes 11
    # (0b1011, not a palindrome) and 9 (top bit set: the sign bit for j = 3, high half).
    num_in = 64
    for code in (11, 9):
        codes = torch.zeros(num_in, num_in, dtype=torch.int32)
        codes[torch.arange(num_in), torch.arange(num_in)] = code
        words = awq_h2pack.pack_words(codes)  # [K rows, K/8]
        for k in range(num_in):
            word, bit = _position(k)
            expected = torch.zeros(num_in // 8, dtype=torch.int32)
            expected[word] = _signed(code << bit)
            assert torch.equal(words[k], expected), (code, k, words[k].tolist())
    # Spot checks straight from the docstring's table.
    assert _position(0) == (0, 0) and _position(1) == (0, 16)
    assert _position(2) == (1, 0) and _position(7) == (3, 16)
    assert _position(8) == (0, 4) and _position(31) == (3, 28)
    assert _position(32 + 8 * 2 + 2 * 1 + 1) == (5, 24)
    # The x pair P[i] = (x[2i], x[2i+1]) the kernel reads for pair j of word t of block b
    # is P[16b + 4j + t]: it holds exactly the two inputs that pair's nibbles code.
    for k in range(0, num_in, 2):
        word, bit = _position(k)
        b, t, j = word // 4, word % 4, bit // 4
        assert 2 * (16 * b + 4 * j + t) == k


def test_scales_zeros_round_trip():
    gen = torch.Generator().manual_seed(3)
    num_out, num_groups = 16, 8
    scales = (torch.randn(num_out, num_groups, generator=gen) * 0.05).to(torch.float16)
    # Edge values too: fp16 bit patterns with the low half's top bit set (negative), the
    # smallest subnormal, the largest finite value, and zero.
    scales[0, :4] = torch.tensor([-0.0123, 2**-24, 65504.0, 0.0], dtype=torch.float16)
    zeros = (torch.arange(num_out * num_groups) % 16).reshape(num_out, num_groups)
    zeros = zeros.to(torch.int32)  # what convert_awq passes: every z in 0..15 present
    packed = awq_h2pack.pack_scales_zeros(scales, zeros)
    assert packed.dtype == torch.int32 and packed.shape == (num_out, num_groups)
    s, z = awq_h2pack.unpack_scales_zeros(packed)
    assert s.dtype == torch.float16 and z.dtype == torch.float32
    assert torch.equal(s.view(torch.int16), scales.view(torch.int16))  # bit for bit
    assert torch.equal(z, zeros.to(torch.float32))
    # The bits: low half s's pattern, high half fp16 1 + z/64 = 0x3C00 + 16 z (z in the
    # mantissa's bits 4..7, as the kernel puts q).
    as_int = packed.to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(as_int & 0xFFFF, scales.view(torch.int16).to(torch.int64) & 0xFFFF)
    assert torch.equal(as_int >> 16, 0x3C00 + 16 * zeros.to(torch.int64))
    # Transposed (non-contiguous) inputs, as convert_awq passes scales.t().
    assert torch.equal(awq_h2pack.pack_scales_zeros(scales.t().contiguous().t(), zeros), packed)


# (K, N, G): every group size, one group over K (None), K a multiple of 32 but not of a
# power-of-two step (96, 160).
CONVERT_SHAPES = [(256, 16, 32), (256, 24, 64), (256, 8, 128), (384, 16, None),
                  (96, 16, 32), (160, 8, 32), (160, 16, None)]


@pytest.mark.parametrize("shape", CONVERT_SHAPES)
def test_conversion_is_exact(shape):
    num_in, num_out, group = shape
    packed = _packed(num_in, num_out, group)
    hp = awq_h2pack.convert_awq(*packed)
    assert hp.group_size == (group or num_in)
    assert hp.words.dtype == torch.int32 and hp.words.shape == (num_out, num_in // 8)
    assert hp.scales_zeros.dtype == torch.int32
    assert hp.scales_zeros.shape == (num_out, num_in // hp.group_size)
    expected = awq_format.dequantize(*packed, torch.float32)
    got = awq_h2pack.dequantize_h2(hp)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    # And the pieces one by one: codes and (s, z) per group.
    codes = awq_format.unpack(packed[0]).t()
    assert torch.equal(awq_h2pack.unpack_words(hp.words), codes)
    s, z = awq_h2pack.unpack_scales_zeros(hp.scales_zeros)
    assert torch.equal(s, packed[2].t())
    assert torch.equal(z, awq_format.unpack(packed[1]).t().to(torch.float32))


def test_linear_ref_rounds_once():
    hp = awq_h2pack.convert_awq(*_packed(96, 16, 32, seed=1))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 96, generator=gen).to(torch.float16)
    bias = torch.randn(16, generator=gen).to(torch.float16)
    expected = (x.float() @ awq_h2pack.dequantize_h2(hp).t() + bias.float()).to(torch.float16)
    got = awq_h2pack.h2_linear_ref(x, hp, bias)
    assert got.dtype == torch.float16 and torch.equal(got, expected)


def _check(hp: awq_h2pack.H2Weight, x: torch.Tensor, bias=None, config=None) -> torch.Tensor:
    expected = x.float() @ awq_h2pack.dequantize_h2(hp).t()
    if bias is not None:
        expected = expected + bias.float()
    got = kernels.awq_gemv_h2(x, hp.words, hp.scales_zeros, hp.group_size, bias, config)
    num_out = hp.words.shape[0]
    assert got.shape == (1, num_out) and got.dtype == torch.float16
    assert torch.isfinite(got).all()
    err = (got.float() - expected).abs().max()
    assert err <= TOL * expected.abs().max(), float(err / expected.abs().max())
    return got


# (K, N, G) under default_config: split 2 (N * 2 < K) with a full and a partial row tile
# (N = 40), K = 160 (steps of one block, uneven splits), one group over K, split 1.
GEMV_SHAPES = [(256, 48, 32), (160, 40, 32), (384, 40, None), (128, 64, 128)]


@pytest.mark.parametrize("shape", GEMV_SHAPES)
def test_gemv_matches_reference(shape):
    num_in, num_out, group = shape
    hp = _h2(num_in, num_out, group)
    gen = torch.Generator().manual_seed(num_in)
    x = torch.randn(1, num_in, generator=gen).to(torch.float16).to(DEVICE)
    _check(hp, x)


@pytest.mark.parametrize("config", [
    kernels.H2GemvConfig(block_n=16, blocks=8, split_k=1, num_warps=4, num_stages=3),
    kernels.H2GemvConfig(block_n=16, blocks=4, split_k=2, num_warps=4, num_stages=2),
    kernels.H2GemvConfig(block_n=8, blocks=2, split_k=3, num_warps=2, num_stages=1),
    # One step a program, 8 splits summed by sum_splits.
    kernels.H2GemvConfig(block_n=32, blocks=1, split_k=8, num_warps=4, num_stages=1),
])
def test_gemv_splits_and_bias(config):
    num_in, num_out, group = 256, 40, 64  # N not a multiple of any block_n above but 8
    hp = _h2(num_in, num_out, group, seed=5)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, num_in, generator=gen).to(torch.float16).to(DEVICE)
    bias = torch.randn(num_out, generator=gen).to(torch.float16).to(DEVICE)
    _check(hp, x, bias, config)


def _weight_from_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group: int) -> awq_h2pack.H2Weight:
    return awq_h2pack.H2Weight(awq_h2pack.pack_words(codes).to(DEVICE),
                               awq_h2pack.pack_scales_zeros(scales, zeros).to(DEVICE), group)


@pytest.mark.parametrize("config", [
    None, kernels.H2GemvConfig(block_n=8, blocks=1, split_k=2, num_warps=2, num_stages=1)])
def test_gemv_codes_at_zero_point_give_exactly_zero(config):
    # q == z everywhere: every (1 + q/64) - (1 + z/64) is an exact fp16 zero, so every fp16
    # sum is 0 and the output is exactly 0, or exactly the bias.
    num_in, num_out, group = 128, 32, 32
    gen = torch.Generator().manual_seed(9)
    zeros = torch.randint(0, 16, (num_out, num_in // group), generator=gen, dtype=torch.int32)
    scales = (torch.rand(num_out, num_in // group, generator=gen) + 0.5).to(torch.float16)
    hp = _weight_from_codes(zeros.repeat_interleave(group, dim=1), scales, zeros, group)
    assert torch.equal(awq_h2pack.dequantize_h2(hp), torch.zeros(num_out, num_in, device=DEVICE))
    x = (torch.randn(1, num_in, generator=gen) * 100).to(torch.float16).to(DEVICE)
    got = kernels.awq_gemv_h2(x, hp.words, hp.scales_zeros, group, config=config)
    assert got.dtype == torch.float16 and torch.equal(got, torch.zeros_like(got))
    bias = torch.randn(num_out, generator=gen).to(torch.float16).to(DEVICE)
    got = kernels.awq_gemv_h2(x, hp.words, hp.scales_zeros, group, bias, config)
    assert torch.equal(got, bias[None, :])


def test_gemv_is_exact_when_every_sum_is_fp16_exact():
    # Integer x in -2..2, every q - z, power-of-two scales: each half's 16 products sum to
    # an integer below 2048 (exact in fp16) and the float32 sums are exact, so the kernel
    # rounds once, to fp16, exactly like the reference. Any misplaced nibble, x pair or
    # group shows as a mismatch here, not as noise inside a tolerance.
    num_in, num_out, group = 128, 24, 64
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (num_out, num_in), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (num_out, num_in // group), generator=gen, dtype=torch.int32)
    exps = torch.randint(-6, 0, (num_out, num_in // group), generator=gen)
    scales = torch.pow(2.0, exps.to(torch.float32)).to(torch.float16)
    hp = _weight_from_codes(codes, scales, zeros, group)
    x = torch.randint(-2, 3, (1, num_in), generator=gen).to(torch.float16).to(DEVICE)
    expected = (x.float() @ awq_h2pack.dequantize_h2(hp).t()).to(torch.float16)
    assert expected.abs().max() > 0
    for config in (None, kernels.H2GemvConfig(block_n=16, blocks=2, split_k=2, num_stages=1)):
        got = kernels.awq_gemv_h2(x, hp.words, hp.scales_zeros, group, config=config)
        assert torch.equal(got, expected), config


def test_gemv_rejects_bad_inputs():
    hp = _h2(64, 16, 32)
    x = torch.randn(1, 64).to(torch.float16).to(DEVICE)
    args = (hp.words, hp.scales_zeros, hp.group_size)
    with pytest.raises(AssertionError, match="float16"):
        kernels.awq_gemv_h2(x.to(torch.bfloat16), *args)
    with pytest.raises(AssertionError, match="float16"):
        kernels.awq_gemv_h2(x.float(), *args)
    with pytest.raises(AssertionError, match=r"\[1, K\]"):
        kernels.awq_gemv_h2(x.repeat(2, 1), *args)
    with pytest.raises(AssertionError, match="scales_zeros must be"):
        kernels.awq_gemv_h2(x, hp.words, hp.scales_zeros[:, :1].contiguous(), hp.group_size)
    with pytest.raises(AssertionError, match="scales_zeros must be"):
        kernels.awq_gemv_h2(x, hp.words, hp.scales_zeros[:8].contiguous(), hp.group_size)
    sz16 = hp.scales_zeros.repeat_interleave(2, dim=1).contiguous()  # [N, K/16]
    with pytest.raises(AssertionError, match="multiples of 32"):
        kernels.awq_gemv_h2(x, hp.words, sz16, 16)
    with pytest.raises(AssertionError, match="words"):
        kernels.awq_gemv_h2(x, hp.words[:, :4].contiguous(), hp.scales_zeros, hp.group_size)
    with pytest.raises(AssertionError, match="bias"):
        kernels.awq_gemv_h2(x, *args, bias=torch.zeros(8, dtype=torch.float16, device=DEVICE))


def test_unsupported_reason_and_conversion_refusals():
    assert awq_h2pack.unsupported_reason(4096, 128) is None
    assert awq_h2pack.unsupported_reason(96, 32) is None
    assert awq_h2pack.unsupported_reason(160, 160) is None  # one group over K
    reason = awq_h2pack.unsupported_reason(48, 16)
    assert reason is not None and "K=48" in reason
    reason = awq_h2pack.unsupported_reason(4096, 48)
    assert reason is not None and "group_size=48" in reason
    reason = awq_h2pack.unsupported_reason(128, 16)
    assert reason is not None and "group_size=16" in reason
    assert awq_h2pack.unsupported_reason(4096, None) is None  # one group (the -1 of configs)
    reason = awq_h2pack.unsupported_reason(96, 64)  # G does not divide K
    assert reason is not None and "group_size=64" in reason
    with pytest.raises(AssertionError, match="group_size=16"):
        awq_h2pack.convert_awq(*_packed(64, 8, 16))
    with pytest.raises(AssertionError, match="K=48"):
        awq_h2pack.convert_awq(*_packed(48, 8, None))
    qweight, qzeros, scales = _packed(64, 8, 32)
    with pytest.raises(AssertionError, match="float16"):
        awq_h2pack.convert_awq(qweight, qzeros, scales.float())
    with pytest.raises(AssertionError, match="multiple of 32"):
        awq_h2pack.pack_words(torch.zeros(2, 48, dtype=torch.int32))


def test_gemv_large_activations_stay_finite():
    # fp16 partial sums hold (q - z)/64 * x: a block of 32 inputs of |x| = 4400, every code
    # 15 and z = 0, sums to 16 * 15/64 * 4400 per half, far inside fp16 (as 1024-based codes
    # it would overflow). The float32 reference is the judge.
    num_in, num_out, group = 64, 8, 32
    codes = torch.full((num_out, num_in), 15, dtype=torch.int32)
    scales = torch.full((num_out, num_in // group), 1e-3, dtype=torch.float16)
    zeros = torch.zeros(num_out, num_in // group, dtype=torch.int32)
    hp = _weight_from_codes(codes, scales, zeros, group)
    for x in (torch.full((1, num_in), 300.0), torch.full((1, num_in), 4400.0)):
        x = x.to(torch.float16).to(DEVICE)
        ref = x.float() @ awq_h2pack.dequantize_h2(hp).t()
        got = kernels.awq_gemv_h2(x, hp.words, hp.scales_zeros, group)
        assert torch.isfinite(got).all()
        assert (got.float() - ref).abs().max() <= 3e-3 * ref.abs().max()


def test_codes_out_of_range_are_refused():
    codes = torch.zeros(2, 32, dtype=torch.int32)
    codes[0, 0] = 16
    with pytest.raises(AssertionError, match="0..15"):
        awq_h2pack.pack_words(codes)
