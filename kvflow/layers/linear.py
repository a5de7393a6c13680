"""Linear layers that know how to shard themselves over tensor-parallel ranks.

Every layer delegates its weights to a ``LinearMethod`` (the quantization
hook): the unquantized method holds one ``weight`` of shape [out, in]; AWQ
holds packed ``qweight``/``qzeros``/``scales``. Each parameter says along
which axes it follows the layer's output and input (``output_dim``,
``input_dim``) and by how much those axes are shrunk (``output_shrink``:
eight 4-bit values per int32; ``input_shrink``: one row per quantization
group), so one loader shards and places them all.

    ColumnParallelLinear  y[:, rank's slice of out] = x @ W_slice.T     (no comm)
    RowParallelLinear     y = all_reduce(x[:, rank's slice of in] @ W_slice.T)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from kvflow import envs
from kvflow.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from kvflow.layers.fast_path import use_triton

DEFAULT_MAX_GEMV_TOKENS = envs.max_gemv_tokens(8)
"""On CUDA, fp16/bf16 matmuls of at most this many tokens run the Triton GEMV
(``kvflow.kernels.gemv``) instead of cuBLAS. Measured on an H100 inside CUDA graphs
(benchmarks/kernels/bench_gemv.py, Llama-2-7B/3-8B linears and LM heads): at one
token the GEMV is 1.04-1.21x faster than F.linear (2.5-3.1 TB/s against 2.0-2.8),
at 2-8 tokens 0.98-1.11x; past 8 the batches are prefill chunks or large decode
batches, where cuBLAS's tensor-core tiles are the better tool. KVFLOW_MAX_GEMV_TOKENS
overrides it (read at import) for A/B runs."""


def set_weight_attrs(param: nn.Parameter, **attrs: object) -> None:
    for key, value in attrs.items():
        setattr(param, key, value)


class LinearMethod(ABC):
    """How a linear layer stores and applies its weights (plain or quantized)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int,
                       dtype: torch.dtype) -> None:
        """Registers the parameters of this rank's [out_features, in_features] slice."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns x @ W.T (+ bias)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repacks loaded weights for the fast path, if the method has one."""

    def apply_silu_mul(self, layer: nn.Module, gate_up: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """silu(gate) * up @ W.T (+ bias) from gate_up [..., 2K] = [gate | up] in one
        kernel, or None where the method has no such kernel for this input (the caller
        then runs the activation and ``apply``)."""
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           max_gemv_tokens: int = DEFAULT_MAX_GEMV_TOKENS) -> torch.Tensor:
    """``F.linear``, through the Triton GEMV for few tokens of fp16/bf16 on CUDA.

    The choice depends on shapes and dtypes only, so it is the same at CUDA-graph
    capture and replay. F.linear stays the CPU path and the twin the GEMV is
    tested against.
    """
    num_tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (use_triton(x) and 0 < num_tokens <= max_gemv_tokens and x.dtype == weight.dtype
            and x.dtype in (torch.float16, torch.bfloat16) and weight.stride(-1) == 1):
        from kvflow.kernels.gemv import MAX_TOKENS, gemv

        if num_tokens <= MAX_TOKENS:
            x2d = x.reshape(num_tokens, x.shape[-1])  # [M, K]
            if x2d.stride(-1) != 1:
                x2d = x2d.contiguous()
            y = gemv(x2d, weight, bias)  # [M, N]
            return y.reshape(*x.shape[:-1], y.shape[-1])
    return F.linear(x, weight, bias)


class UnquantizedLinearMethod(LinearMethod):
    """A plain [out, in] weight; ``linear`` picks the Triton GEMV or cuBLAS per call."""

    def __init__(self, *, max_gemv_tokens: int = DEFAULT_MAX_GEMV_TOKENS) -> None:
        self.max_gemv_tokens = max_gemv_tokens

    def create_weights(self, layer, in_features, out_features, dtype):
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                              requires_grad=False)
        set_weight_attrs(weight, output_dim=0, input_dim=1, output_shrink=1, input_shrink=1)
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias=None):
        return linear(x, layer.weight, bias, max_gemv_tokens=self.max_gemv_tokens)


class LinearBase(nn.Module):
    """Holds the method, the optional bias, and the shard-aware weight loader."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool,
                 dtype: torch.dtype, linear_method: Optional[LinearMethod],
                 shard_output: bool, shard_input: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.shard_output, self.shard_input = shard_output, shard_input
        self.in_features = in_features // self.tp_size if shard_input else in_features
        self.out_features = out_features
        self.method = linear_method or UnquantizedLinearMethod()
        self.method.create_weights(self, self.in_features, self.out_features, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype),
                                     requires_grad=False)
            set_weight_attrs(self.bias, output_dim=0, output_shrink=1)
        else:
            self.register_parameter("bias", None)

    # Output slices of fused layers: (offset, size) in unsharded units, per shard id.
    def _output_slice(self, shard_id: Union[int, str, None], full: int) -> tuple[int, int, int]:
        """(offset in this rank's param, size, offset in the loaded tensor) along output."""
        size = full // self.tp_size if self.shard_output else full
        src = self.tp_rank * size if self.shard_output else 0
        return 0, size, src

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Union[int, str, None] = None) -> None:
        """Copies this rank's part of a checkpoint tensor into ``param``."""
        out_dim = getattr(param, "output_dim", None)
        in_dim = getattr(param, "input_dim", None)
        target = param.data
        if out_dim is not None:
            shrink = getattr(param, "output_shrink", 1)
            full = loaded.shape[out_dim] * shrink
            dst_off, size, src_off = self._output_slice(shard_id, full)
            loaded = loaded.narrow(out_dim, src_off // shrink, size // shrink)
            target = target.narrow(out_dim, dst_off // shrink, size // shrink)
        if in_dim is not None and self.shard_input and self.tp_size > 1:
            size = target.shape[in_dim]
            loaded = loaded.narrow(in_dim, self.tp_rank * size, size)
        if target.shape != loaded.shape:
            raise ValueError(
                f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter slice "
                f"{tuple(target.shape)} of {type(self).__name__} (shard {shard_id!r})."
            )
        target.copy_(loaded)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}"


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32,
                 linear_method: Optional[LinearMethod] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype,
                         linear_method=linear_method, shard_output=False, shard_input=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Splits the output features over ranks; each rank returns its slice (no gather)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32,
                 linear_method: Optional[LinearMethod] = None, gather_output: bool = False) -> None:
        tp = get_tp_size()
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by "
                             f"tensor_parallel_size={tp}.")
        self.gather_output = gather_output
        super().__init__(in_features, out_features // tp, bias=bias, dtype=dtype,
                         linear_method=linear_method, shard_output=True, shard_input=False)

    def _output_slice(self, shard_id, full):
        size = full // self.tp_size
        return 0, size, self.tp_rank * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x, self.bias)
        return tp_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate_up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], **kwargs: object) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), **kwargs)  # type: ignore[arg-type]

    def _output_slice(self, shard_id, full):
        assert isinstance(shard_id, int), "merged layers load one shard id at a time"
        size = self.output_sizes[shard_id] // self.tp_size
        dst = sum(self.output_sizes[:shard_id]) // self.tp_size
        return dst, size, self.tp_rank * size


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection, split by heads; KV heads are replicated when fewer than ranks.

    Layout of this rank's output: [q heads of the rank | its kv heads (k) | (v)].
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 **kwargs: object) -> None:
        tp = get_tp_size()
        if num_heads % tp:
            raise ValueError(f"{num_heads} attention heads are not divisible by "
                             f"tensor_parallel_size={tp}.")
        if num_kv_heads >= tp and num_kv_heads % tp:
            raise ValueError(f"{num_kv_heads} KV heads are not divisible by "
                             f"tensor_parallel_size={tp}.")
        if num_kv_heads < tp and tp % num_kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} is not a multiple of the "
                             f"{num_kv_heads} KV heads.")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, **kwargs)  # type: ignore[arg-type]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _output_slice(self, shard_id, full):
        if shard_id == "q":
            return 0, self.q_size, self.tp_rank * self.q_size
        kv_rank = self.tp_rank // self.kv_replicas
        dst = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        return dst, self.kv_size, kv_rank * self.kv_size


class RowParallelLinear(LinearBase):
    """Splits the input features over ranks and sums the partial outputs (one all-reduce)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32,
                 linear_method: Optional[LinearMethod] = None, reduce_results: bool = True) -> None:
        tp = get_tp_size()
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by "
                             f"tensor_parallel_size={tp}.")
        self.reduce_results = reduce_results
        super().__init__(in_features, out_features, bias=bias, dtype=dtype,
                         linear_method=linear_method, shard_output=False, shard_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self.method.apply(self, x, None))

    def forward_silu_mul(self, gate_up: torch.Tensor) -> Optional[torch.Tensor]:
        """``forward(silu(gate) * up)`` with the activation fused into the matmul where
        the method can (``LinearMethod.apply_silu_mul``), else None."""
        y = self.method.apply_silu_mul(self, gate_up, None)
        return None if y is None else self._finish(y)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.reduce_results:
            y = tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
