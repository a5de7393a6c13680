"""AWQ int4 weights (AutoAWQ's GEMM layout): the checkpoint's settings and the linear method.

The layout and its plain-torch reference live in ``awq_format``; the GPU
kernels in ``kvflow.kernels.awq_gemm`` (Triton, AutoAWQ's layout), for 1..4 tokens
``kvflow.kernels.awq_gemv`` (Triton, the K-packed repack of ``awq_kpack``) and,
for small batches in bfloat16, PyTorch's tinygemm through ``awq_int4pack``. ``AWQLinearMethod`` gives each
quantized linear layer three parameters whose ``output_dim``/``input_dim``
and shrink factors let ``LinearBase.weight_loader`` shard and place them like
a plain weight (K = this rank's input features, N = its output features,
G = group size)::

    param    shape       output_dim  output_shrink  input_dim          input_shrink
    qweight  [K, N/8]    1           8              0                  1
    qzeros   [K/G, N/8]  1           8              0 (None if G = K)  G
    scales   [K/G, N]    1           1              0 (None if G = K)  G

With ``group_size=-1`` the one row of zeros and scales covers the whole
unsharded input, so every rank of a row-parallel layer loads that same row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvflow import envs
from kvflow.layers.linear import LinearMethod, set_weight_attrs
from kvflow.logger import init_logger
from kvflow.quantization import awq_format, awq_int4pack, awq_kpack
from kvflow.quantization.detect import CheckpointQuantConfig, find_quant_config

logger = init_logger(__name__)

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SUPPORTED_VERSIONS = ("gemm",)

DEFAULT_MAX_FUSED_TOKENS = 128
"""On CUDA, batches of at most this many tokens run the fused int4 kernels (one token:
the CUDA-core GEMV; more: the tensor-core GEMM, see ``kvflow.kernels.awq_gemm``);
larger ones dequantize to a half-precision weight and call cuBLAS. The fused kernels
read a quarter of the bytes, which wins while the matmul is bound by weight reads
(decode); past the crossover, cuBLAS's tensor-core efficiency outweighs the cost of
writing and re-reading the dequantized weight. Measured on an H100 up to 16 tokens
(benchmarks/kernels/bench_gemv.py: fused 2-3x faster than dequantize + cuBLAS on the
Llama shapes); the crossover above that is still to be measured
(benchmarks/kernels/check_awq_gpu.py prints both sides per batch)."""

DEFAULT_MAX_INT4PACK_TOKENS = 4
"""On CUDA, batches of at most this many tokens run tinygemm (``awq_int4pack``) where the
layer was repacked for it; larger ones the Triton kernels. Measured on an H100
(torch 2.11, ``benchmarks/kernels/bench_gemv.py --int4pack``, Llama-3-8B, group 128),
tinygemm vs Triton int4 in us::

    M      qkv          o            gate_up       down
    1      10.4 / 20.4  7.1 / 15.5   33.8 / 43.8   18.9 / 30.7
    4      13.8 / 20.7  9.0 / 15.8   46.6 / 73.5   26.2 / 41.1
    8      22.5 / 20.5  13.5 / 15.8  78.5 / 73.7   42.1 / 41.4
    16     36.2 / 19.8  22.1 / 15.1  133.6 / 70.9  72.1 / 40.1

tinygemm's time grows with M from 4 on (it is built for GEMV-like shapes) while the
Triton tensor-core GEMM stays flat, so they cross between 4 and 8 tokens."""

DEFAULT_MAX_GEMV_TOKENS = 4
"""With ``kernel="gemv"``, batches of at most this many fp16/bf16 tokens run the
K-packed GEMV (``kvflow.kernels.awq_gemv``); it is tried before tinygemm."""

AUTO_MAX_GEMV_TOKENS = 0
"""The same bound under ``kernel="auto"`` for layers tinygemm runs (0: they keep
tinygemm). H100, benchmarks/RESULTS.md "third session: AWQ int4 GEMV": tinygemm is
faster at 1, 2 and 4 tokens on every Llama-3-8B matrix (68.7 vs 85.2 us a layer at 1)."""

AUTO_ONE_TOKEN_ROWS = False
"""Whether ``kernel="auto"`` runs one token on ``kvflow.kernels.awq_gemv_rows`` (over
AutoAWQ's own layout; no repack of the codes) wherever it takes the layer."""

AUTO_FALLBACK_GEMV_TOKENS = 1
"""Under ``kernel="auto"``, layers tinygemm cannot run (float16 models -- the dtype AWQ
checkpoints usually declare --, or unsupported shapes) take the K-packed GEMV for one
token instead of the Triton int4 GEMV over AWQ's layout: 85.2 vs ~109 us a Llama-3-8B
layer (H100; L1 261 vs 221 tok/s in bfloat16). At 2 and 4 tokens it is not measured
against the Triton kernels, so they keep those."""

# kvflow fuses these checkpoint linears; ``modules_to_not_convert`` names the parts.
_FUSED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _first(values: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if values.get(name) is not None:
            return values[name]
    return default


@dataclass(frozen=True)
class AWQConfig:
    """An AWQ checkpoint's settings, validated: 4-bit, zero point, GEMM layout."""

    group_size: Optional[int]
    """Input features that share one scale and zero point; None for one group over the
    whole input (the checkpoint's ``-1``)."""
    modules_to_not_convert: tuple[str, ...] = ()
    """Checkpoint module names (substring match, as AutoAWQ does) left unquantized."""
    source: str = "config.json (quantization_config)"
    """Where the settings were read, for error messages."""

    @classmethod
    def from_checkpoint_config(cls, found: CheckpointQuantConfig) -> "AWQConfig":
        """Validates the raw settings; accepts AutoAWQ's and transformers' key names."""
        values, where = found.values, found.source
        bits = int(_first(values, "bits", "w_bit", default=4))
        if bits != 4:
            raise ValueError(f"AWQ checkpoint with bits={bits} (from {where}): kvflow runs 4-bit "
                             "AWQ only. Use a 4-bit export.")
        group = int(_first(values, "group_size", "q_group_size", default=128))
        if group not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"AWQ group_size={group} (from {where}) is not supported; "
                             f"kvflow supports {SUPPORTED_GROUP_SIZES}.")
        if not bool(_first(values, "zero_point", default=True)):
            raise ValueError(f"AWQ checkpoint with zero_point=false (from {where}): kvflow runs "
                             "AutoAWQ's zero-point (asymmetric) GEMM layout only.")
        version = str(_first(values, "version", default="gemm")).lower()
        if version in ("gemv", "gemv_fast"):
            raise ValueError(
                f"AWQ checkpoint in the {version.upper()} layout (version={version!r} in {where}): "
                "its tensors are stored transposed and interleaved for AutoAWQ's GEMV kernel, "
                "which kvflow does not read. Re-export it with AutoAWQ version='GEMM' "
                "(the layout published by most AWQ checkpoints on the hub).")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"AWQ version={version!r} (from {where}) is not supported; kvflow "
                             f"reads {SUPPORTED_VERSIONS}.")
        skip = values.get("modules_to_not_convert") or ()
        if isinstance(skip, str):
            skip = (skip,)
        return cls(group_size=None if group == -1 else group,
                   modules_to_not_convert=tuple(str(m) for m in skip), source=where)

    @classmethod
    def from_model(cls, hf_config: Any, model_dir: Optional[str]) -> "AWQConfig":
        """Reads config.json's ``quantization_config`` or the side file beside it."""
        found = find_quant_config(hf_config, model_dir)
        if found is None:
            raise ValueError(f"quantization='awq' was asked for, but {model_dir!r} has no "
                             "quantization_config in config.json nor a quant_config.json / "
                             "quantize_config.json; it holds unquantized weights.")
        return cls.from_checkpoint_config(found)

    def is_skipped(self, prefix: str) -> bool:
        """Whether the linear layer at ``prefix`` stays unquantized.

        A fused layer (``qkv_proj``, ``gate_up_proj``) is skipped when all its
        checkpoint parts are; a checkpoint that quantizes some parts and not
        others cannot be fused and is refused.
        """
        if not self.modules_to_not_convert:
            return False
        head, _, last = prefix.rpartition(".")
        parts = _FUSED_PARTS.get(last, (last,))
        names = [f"{head}.{p}" if head else p for p in parts]
        skipped = [any(key in name for key in self.modules_to_not_convert) for name in names]
        if any(skipped) and not all(skipped):
            raise ValueError(
                f"modules_to_not_convert={list(self.modules_to_not_convert)} (from {self.source}) "
                f"leaves {[n for n, s in zip(names, skipped) if s]} unquantized but not "
                f"{[n for n, s in zip(names, skipped) if not s]}; kvflow fuses them into "
                f"{prefix} and needs them all quantized or all left alone.")
        return all(skipped)


def auto_gemv_tokens(has_int4pack: bool, max_gemv_tokens: int) -> int:
    """Tokens up to which an ``auto`` CUDA layer runs the K-packed GEMV: the method's bound
    where tinygemm took the layer, else (float16, or a shape tinygemm refuses) at least
    ``AUTO_FALLBACK_GEMV_TOKENS``."""
    return max_gemv_tokens if has_int4pack else max(max_gemv_tokens, AUTO_FALLBACK_GEMV_TOKENS)


class AWQLinearMethod(LinearMethod):
    """Packed int4 weights: exact dequantization on CPU; K-packed GEMV, tinygemm or
    Triton on CUDA.

    State lives on the layer (its three parameters, on CPU the dequantized weight,
    on CUDA maybe the K-packed repack ``layer.kpack`` and the tinygemm repack
    ``layer.int4pack``); the method itself holds only settings, so one instance
    serves every layer. A batch takes the first that applies: ``kpack`` for at most
    ``max_gemv_tokens`` fp16/bf16 tokens, ``int4pack`` for at most
    ``max_int4pack_tokens`` bf16 tokens, then the Triton kernels over AWQ's layout.

    ``kernel`` (``envs.AWQ_KERNELS``; the engine passes ``KVFLOW_AWQ_KERNEL``):
    ``auto`` repacks every CUDA layer for tinygemm where that is supported (bfloat16)
    and ``max_int4pack_tokens`` reaches past ``max_gemv_tokens``, and for the GEMV
    where ``max_gemv_tokens`` > 0 or tinygemm cannot take the layer (float16: one token,
    ``auto_gemv_tokens``);
    ``gemv`` repacks every layer for the GEMV only (also on CPU, where the Triton
    kernel then runs under TRITON_INTERPRET=1: the tests' way into this path);
    ``int4pack`` repacks every layer for tinygemm and raises where it cannot (on CPU
    through torch's CPU twin of the op); ``triton`` never repacks.

    Memory: a repacked layer keeps its AWQ tensors too, for larger batches (the
    Triton GEMM and dequantize + cuBLAS read them), so its int4 bytes roughly double
    per repack (+~4.5 GB for Llama-3-8B). The small-batch kernels at prefill sizes
    are slower than those paths, and re-deriving AWQ tensors per prefill would cost
    more than the memory.
    """

    def __init__(self, config: AWQConfig, *,
                 max_fused_tokens: int = DEFAULT_MAX_FUSED_TOKENS,
                 kernel: str = "auto",
                 max_int4pack_tokens: int = DEFAULT_MAX_INT4PACK_TOKENS,
                 max_gemv_tokens: Optional[int] = None) -> None:
        if kernel not in envs.AWQ_KERNELS:
            raise ValueError(f"AWQ kernel {kernel!r} is not one of {envs.AWQ_KERNELS} "
                             "(KVFLOW_AWQ_KERNEL).")
        self.config = config
        self.max_fused_tokens = max_fused_tokens
        self.kernel = kernel
        self.max_int4pack_tokens = max_int4pack_tokens
        from kvflow.kernels.awq_gemv import MAX_TOKENS
        if max_gemv_tokens is None:
            max_gemv_tokens = (AUTO_MAX_GEMV_TOKENS if kernel == "auto"
                               else DEFAULT_MAX_GEMV_TOKENS if kernel == "gemv" else 0)
        if not 0 <= max_gemv_tokens <= MAX_TOKENS:
            raise ValueError(f"max_gemv_tokens={max_gemv_tokens}: the AWQ GEMV holds 0.."
                             f"{MAX_TOKENS} tokens.")
        self.max_gemv_tokens = max_gemv_tokens

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int,
                       dtype: torch.dtype) -> None:
        group = self.config.group_size or in_features
        pack = awq_format.PACK_FACTOR
        if in_features % group:
            raise ValueError(
                f"{type(layer).__name__} has {in_features} input features on this rank, not a "
                f"multiple of the AWQ group_size={group}; lower tensor_parallel_size.")
        # Every fused/sharded slice must start and end on a whole int32 of eight columns.
        slice_sizes = [out_features]
        if hasattr(layer, "output_sizes"):
            slice_sizes += [s // layer.tp_size for s in layer.output_sizes]
        if hasattr(layer, "head_dim"):
            slice_sizes.append(layer.head_dim)
        if any(s % pack for s in slice_sizes):
            raise ValueError(
                f"{type(layer).__name__} output slices {slice_sizes} on this rank are not all "
                f"multiples of {pack}: AWQ packs {pack} output columns per int32, so they "
                "cannot be split there; lower tensor_parallel_size.")
        is_grouped = self.config.group_size is not None
        qweight = nn.Parameter(torch.empty(in_features, out_features // pack, dtype=torch.int32),
                               requires_grad=False)
        set_weight_attrs(qweight, output_dim=1, input_dim=0, output_shrink=pack, input_shrink=1)
        qzeros = nn.Parameter(torch.empty(in_features // group, out_features // pack,
                                          dtype=torch.int32), requires_grad=False)
        set_weight_attrs(qzeros, output_dim=1, input_dim=0 if is_grouped else None,
                         output_shrink=pack, input_shrink=group)
        # Checkpoints store float16 scales; keeping them so (not the model dtype) keeps
        # bfloat16 models exact up to the final rounding of each weight.
        scales = nn.Parameter(torch.empty(in_features // group, out_features,
                                          dtype=torch.float16), requires_grad=False)
        set_weight_attrs(scales, output_dim=1, input_dim=0 if is_grouped else None,
                         output_shrink=1, input_shrink=group)
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qzeros", qzeros)
        layer.register_parameter("scales", scales)
        layer.awq_dtype = dtype
        layer.register_buffer("dequantized_weight", None, persistent=False)
        layer.int4pack = None  # awq_int4pack.Int4PackWeight once repacked
        layer.kpack = None  # awq_kpack.KPackWeight once repacked
        layer.scales_by_nibble = None  # awq_gemv_rows.nibble_major_scales, for one token

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """On CPU, dequantizes once into ``layer.dequantized_weight`` [N, K].

        Measured on the project's 2-core CPU box (float32, 2048 x 2048, one token):
        0.3 ms for the matmul on a cached weight, ~180 ms when dequantizing per
        call (unpacking int32 nibbles is slow in eager torch). So the CPU path
        trades memory (a float weight beside the packed one) for speed; it stays
        exact either way. CUDA keeps only packed tensors (reading fewer bytes is the
        point there), plus, unless ``kernel="triton"``, tinygemm's repack of them:
        made here because this is the first moment the rank's shard is whole, so
        tensor-parallel layers repack exactly what they multiply.
        """
        device = layer.qweight.device
        is_auto_cuda = self.kernel == "auto" and device.type == "cuda"
        layer.gemv_tokens = self.max_gemv_tokens
        if self.kernel == "rows" or (is_auto_cuda and AUTO_ONE_TOKEN_ROWS):
            self._prepare_rows(layer)
        if self.kernel == "gemv" or (is_auto_cuda and self.max_gemv_tokens > 0):
            # Any AWQ layer fits the GEMV's layout (K a multiple of 8, G dividing K).
            layer.kpack = awq_kpack.convert_awq(layer.qweight, layer.qzeros, layer.scales)
        if self.kernel == "int4pack" or (
                is_auto_cuda and self.max_int4pack_tokens > self.max_gemv_tokens):
            self._repack_for_int4pack(layer)
        if is_auto_cuda and layer.kpack is None and layer.scales_by_nibble is None:
            layer.gemv_tokens = auto_gemv_tokens(layer.int4pack is not None, self.max_gemv_tokens)
            if layer.gemv_tokens:
                layer.kpack = awq_kpack.convert_awq(layer.qweight, layer.qzeros, layer.scales)
        if (device.type == "cpu" and layer.int4pack is None and layer.kpack is None
                and layer.scales_by_nibble is None):
            layer.dequantized_weight = awq_format.dequantize(
                layer.qweight, layer.qzeros, layer.scales, layer.awq_dtype)

    def _prepare_rows(self, layer: nn.Module) -> None:
        """Sets ``layer.scales_by_nibble`` where ``awq_gemv_rows`` takes the layer (all
        it needs beyond the checkpoint's tensors); logs and leaves None elsewhere."""
        from kvflow.kernels import awq_gemv_rows

        num_in, num_out = layer.qweight.shape[0], layer.scales.shape[1]
        group = self.config.group_size or num_in
        reason = awq_gemv_rows.rows_unsupported_reason(num_in, num_out, group)
        if reason is not None:
            logger.debug("AWQ layer [N=%d, K=%d] keeps other kernels: %s", num_out, num_in, reason)
            return
        layer.scales_by_nibble = awq_gemv_rows.nibble_major_scales(layer.scales)

    def _repack_for_int4pack(self, layer: nn.Module) -> None:
        """Sets ``layer.int4pack`` from this rank's loaded shard, or leaves it None
        (``auto``) / raises (``int4pack``) where tinygemm cannot run the layer."""
        num_in, num_out = layer.qweight.shape[0], layer.scales.shape[1]
        reason = awq_int4pack.unsupported_reason(num_in, num_out, self.config.group_size,
                                                 layer.awq_dtype, layer.qweight.device)
        if reason is not None:
            if self.kernel == "int4pack":
                raise ValueError(f"KVFLOW_AWQ_KERNEL=int4pack: {type(layer).__name__} "
                                 f"[N={num_out}, K={num_in}] cannot run on tinygemm: {reason}. "
                                 "Use KVFLOW_AWQ_KERNEL=auto or triton.")
            logger.debug("AWQ layer [N=%d, K=%d] stays on Triton: %s", num_out, num_in, reason)
            return
        layer.int4pack = awq_int4pack.convert_awq(layer.qweight, layer.qzeros, layer.scales,
                                                  self.config.group_size)

    def apply_silu_mul(self, layer: nn.Module, gate_up: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """One token on ``awq_gemv_rows`` computes silu(gate) * up as it reads its input
        (the activation kernel's launch saved); anything else returns None."""
        if not self._takes_rows(layer, gate_up):
            return None
        return self._apply_rows(layer, gate_up, bias, gated=True)

    @staticmethod
    def _takes_rows(layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``awq_gemv_rows`` runs x: one fp16/bf16 token on a layer prepared for it."""
        return (getattr(layer, "scales_by_nibble", None) is not None
                and x.numel() == x.shape[-1] and x.dtype in (torch.float16, torch.bfloat16))

    def _apply_rows(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor],
                    gated: bool) -> torch.Tensor:
        """x [..., K] (or [..., 2K] = [gate | up] when ``gated``), one token, on
        ``awq_gemv_rows``."""
        from kvflow.kernels.awq_gemv_rows import awq_gemv_rows

        num_in = x.shape[-1] // 2 if gated else x.shape[-1]
        y = awq_gemv_rows(x.reshape(1, x.shape[-1]).contiguous(), layer.qweight, layer.qzeros,
                          layer.scales_by_nibble, self.config.group_size or num_in, bias,
                          gated=gated)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        cached = layer.dequantized_weight
        if cached is not None:
            return F.linear(x, cached, bias)
        if self._takes_rows(layer, x):
            return self._apply_rows(layer, x, bias, gated=False)
        num_tokens = x.numel() // x.shape[-1]
        kpack = layer.kpack
        gemv_tokens = getattr(layer, "gemv_tokens", self.max_gemv_tokens)
        if (kpack is not None and 0 < num_tokens <= gemv_tokens
                and x.dtype in (torch.float16, torch.bfloat16)):
            from kvflow.kernels.awq_gemv import awq_gemv

            x2d = x.reshape(num_tokens, x.shape[-1])  # [M, K]
            if x2d.stride(-1) != 1:
                x2d = x2d.contiguous()
            y = awq_gemv(x2d, kpack.words, kpack.scales_zeros, kpack.group_size, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        int4pack = layer.int4pack
        if int4pack is not None and num_tokens <= self.max_int4pack_tokens:
            return awq_int4pack.int4pack_linear(x, int4pack, bias)
        if x.device.type != "cuda":  # weights moved off CPU after loading: slow but exact
            weight = awq_format.dequantize(layer.qweight, layer.qzeros, layer.scales, x.dtype)
            return F.linear(x, weight, bias)
        from kvflow.kernels import awq_gemm as kernels

        x2d = x.reshape(-1, x.shape[-1])  # [M, K]
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        is_half = x.dtype in (torch.float16, torch.bfloat16)
        if is_half and x2d.shape[0] <= self.max_fused_tokens:
            y = kernels.awq_gemm(x2d, layer.qweight, layer.qzeros, layer.scales, bias=bias)
        else:
            weight = kernels.awq_dequantize(layer.qweight, layer.qzeros, layer.scales, x.dtype)
            y = F.linear(x2d, weight, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def awq_linear_method_factory(model_config: Any) -> Callable[[str], Optional[LinearMethod]]:
    """The model's quantization hook: prefix -> AWQLinearMethod, or None where the
    checkpoint keeps the layer unquantized (``modules_to_not_convert``)."""
    config = AWQConfig.from_model(model_config.hf_config, model_config.model)
    method = AWQLinearMethod(config, kernel=envs.awq_kernel())

    def for_prefix(prefix: str) -> Optional[LinearMethod]:
        return None if config.is_skipped(prefix) else method

    return for_prefix
