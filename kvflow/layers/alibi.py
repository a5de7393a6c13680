"""ALiBi slopes: the per-head factors the attention backend multiplies by (k - p).

Two families of checkpoints were trained with two different slope schedules,
and a model only reproduces its training numerics with its own (H heads):

    MPT (mosaicml)   P = next power of two >= H
                     slope[i] = 2 ** -((i + 1) * alibi_bias_max / P)   for i < P
                     H < P: the odd-indexed slopes first, then the even ones, cut to H
    Bloom / Falcon   P = last power of two <= H,  b(P) = 2 ** -(2 ** -(log2(P) - 3))
                     slope[i] = b(P) ** (i + 1)                        for i < P
                     H > P: then b(2P) ** 1, 3, 5, ... for the H - P extra heads

Both are computed in float32 on the CPU with the same torch operations as the
reference implementations, so the float32 slopes are bit-identical to theirs,
then moved to the device the model is being built on.

Backends add ``slope[h] * (k - p)``; references add ``slope[h] * k`` (Falcon)
or ``slope[h] * (k - last)`` (MPT). The three differ by a constant per query
row, which the softmax cancels.
"""

from __future__ import annotations

import math

import torch

from kvflow.distributed.parallel_state import get_tp_rank, get_tp_size


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """float32 [H] slopes of mosaicml's MPT (``gen_slopes``), any head count."""
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got num_heads={num_heads}.")
    padded = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, padded + 1, dtype=torch.int64, device="cpu").float()
    exponents = exponents * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, exponents)
    if padded != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return _to_default_device(slopes)


def bloom_alibi_slopes(num_heads: int) -> torch.Tensor:
    """float32 [H] slopes of Bloom and Falcon (``build_alibi_tensor``), any head count."""
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got num_heads={num_heads}.")

    def powers(num_pow2: int, exponents: torch.Tensor) -> torch.Tensor:
        base = torch.tensor(2 ** (-(2 ** -(math.log2(num_pow2) - 3))), dtype=torch.float32,
                            device="cpu")
        return torch.pow(base, exponents)

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest, torch.arange(1, 1 + closest, dtype=torch.int32, device="cpu"))
    if closest != num_heads:
        num_extra = num_heads - closest  # < closest, by the choice of closest
        odd = torch.arange(1, 1 + 2 * num_extra, 2, dtype=torch.int32, device="cpu")
        slopes = torch.cat([slopes, powers(2 * closest, odd)])
    return _to_default_device(slopes)


def shard_heads(slopes: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's slice of per-head values (heads are split in rank order)."""
    tp = get_tp_size()
    if slopes.shape[0] % tp:
        raise ValueError(f"{slopes.shape[0]} attention heads are not divisible by "
                         f"tensor_parallel_size={tp}.")
    size = slopes.shape[0] // tp
    return slopes[get_tp_rank() * size:(get_tp_rank() + 1) * size].contiguous()


def _to_default_device(slopes: torch.Tensor) -> torch.Tensor:
    # Models are built under `with torch.device(...)`; the slopes must live there too.
    return slopes.to(torch.get_default_device())
