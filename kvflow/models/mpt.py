"""MPT (mosaicml): ALiBi instead of positions, one fused ``Wqkv``, pre-norm blocks.

Both checkpoint layouts load here, with the same tensor names:

- transformers' ``MptForCausalLM`` (``attn_config`` a sub-config object);
- mosaicml's remote-code ``MPTForCausalLM`` (``attn_config`` a plain dict),
  which may use features transformers does not implement: linear and norm
  biases (``no_bias=False``), LayerNorm on q and k (``qk_ln``), multi-query
  and grouped-query attention (``attn_type``, ``kv_n_heads``), an
  ``expansion_ratio`` other than 4, and ``logit_scale``.

Where the two implementations disagree, mosaicml's semantics win: its code
trained the checkpoints. transformers' ``clip_qkv`` and ALiBi agree with it.

"Low-precision" LayerNorm (mosaicml's default ``norm_type``) only differs from
LayerNorm under autocast, where it normalises in the autocast dtype; kvflow
runs the whole model in one dtype, which gives the same numerics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.parallel_state import get_tp_size
from kvflow.layers.alibi import mpt_alibi_slopes, shard_heads
from kvflow.layers.attention import Attention
from kvflow.layers.embedding import VocabParallelEmbedding
from kvflow.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvflow.layers.norm import LayerNorm
from kvflow.models.base import CausalLMWithHead, ModelContext, get_cfg, load_with_fused_qkv

_NORM_TYPES = ("layernorm", "low_precision_layernorm")


@dataclass(frozen=True)
class MptArch:
    vocab_size: int
    hidden_size: int
    ffn_size: int
    """Width of the MLP (``expansion_ratio * d_model`` unless the ffn config names it)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Heads of K and V: all (multi-head), 1 (multi-query) or ``kv_n_heads`` (grouped)."""
    head_dim: int
    max_position: int
    """The config's ``max_seq_len``, under the name the other families' archs use."""
    alibi_bias_max: float
    softmax_scale: float
    clip_qkv: Optional[float]
    """q, k and v are clamped to [-clip_qkv, clip_qkv] right after Wqkv."""
    has_qk_ln: bool
    """LayerNorm over all of q (width H*D) and all of k (Hkv*D), after the clamp."""
    has_bias: bool
    """Biases on every linear layer and norm (mosaicml's ``no_bias=False``)."""
    norm_eps: float
    tie_word_embeddings: bool
    logit_scale: Optional[float]
    """Multiplies the logits (mosaicml; ``"inv_sqrt_d_model"`` is 1/sqrt(d_model))."""

    @classmethod
    def from_hf(cls, cfg: Any) -> "MptArch":
        attn = get_cfg(cfg, "attn_config", default={})
        hidden = int(get_cfg(cfg, "d_model", "hidden_size"))
        num_heads = int(get_cfg(cfg, "n_heads", "num_attention_heads"))
        head_dim = hidden // num_heads

        def unsupported(what: str) -> ValueError:
            return ValueError(f"MPT checkpoint with {what} is not supported by kvflow.")

        if get_cfg(attn, "alibi") is not True:
            raise unsupported(f"attn_config.alibi={get_cfg(attn, 'alibi')!r} (only ALiBi, "
                              "which every released MPT uses)")
        for flag in ("prefix_lm", "rope", "qk_gn"):
            if get_cfg(attn, flag):
                raise unsupported(f"attn_config.{flag}=true")
        attn_type = get_cfg(attn, "attn_type", default="multihead_attention")
        if attn_type == "multihead_attention":
            num_kv_heads = num_heads
        elif attn_type == "multiquery_attention":
            num_kv_heads = 1
        elif attn_type == "grouped_query_attention":
            num_kv_heads = int(get_cfg(attn, "kv_n_heads", default=num_heads))
        else:
            raise unsupported(f"attn_config.attn_type={attn_type!r} (supported: "
                              "multihead_attention, multiquery_attention, grouped_query_attention)")
        if num_heads % num_kv_heads:
            raise ValueError(f"MPT n_heads={num_heads} is not a multiple of "
                             f"kv_n_heads={num_kv_heads}.")
        norm_type = str(get_cfg(cfg, "norm_type", default="low_precision_layernorm")).lower()
        if norm_type not in _NORM_TYPES:
            raise unsupported(f"norm_type={norm_type!r} (supported: {', '.join(_NORM_TYPES)})")
        ffn = get_cfg(cfg, "ffn_config", default={})
        ffn_type = get_cfg(ffn, "ffn_type", default="mptmlp")
        if ffn_type != "mptmlp":
            raise unsupported(f"ffn_config.ffn_type={ffn_type!r} (supported: mptmlp)")
        act = get_cfg(ffn, "ffn_act_fn")
        if act is not None and (get_cfg(act, "name") != "gelu"
                                or get_cfg(act, "approximate", default="none") != "none"):
            raise unsupported(f"ffn_config.ffn_act_fn={act!r} (supported: exact gelu)")
        ffn_size = get_cfg(ffn, "ffn_hidden_size")
        if ffn_size is None:
            ffn_size = int(get_cfg(cfg, "expansion_ratio", default=4) * hidden)
        logit_scale = get_cfg(cfg, "logit_scale")
        if logit_scale == "inv_sqrt_d_model":
            logit_scale = 1 / math.sqrt(hidden)
        elif isinstance(logit_scale, str):
            raise unsupported(f"logit_scale={logit_scale!r} (a number or 'inv_sqrt_d_model')")
        softmax_scale = get_cfg(attn, "softmax_scale")
        clip = get_cfg(attn, "clip_qkv")
        return cls(
            vocab_size=int(cfg.vocab_size),
            hidden_size=hidden,
            ffn_size=int(ffn_size),
            num_layers=int(get_cfg(cfg, "n_layers", "num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position=int(get_cfg(cfg, "max_seq_len", default=2048)),
            alibi_bias_max=float(get_cfg(attn, "alibi_bias_max", default=8)),
            softmax_scale=(float(softmax_scale) if softmax_scale is not None
                           else 1 / math.sqrt(hidden / num_heads)),
            clip_qkv=float(clip) if clip else None,  # both references skip a clip of 0
            has_qk_ln=bool(get_cfg(attn, "qk_ln", default=False)),
            has_bias=not get_cfg(cfg, "no_bias", default=True),
            norm_eps=float(get_cfg(cfg, "layer_norm_epsilon", "norm_eps", default=1e-5)),
            tie_word_embeddings=bool(get_cfg(cfg, "tie_word_embeddings", default=True)),
            logit_scale=None if logit_scale is None else float(logit_scale),
        )


class MptAttention(nn.Module):
    def __init__(self, arch: MptArch, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.Wqkv = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads,
                                      arch.num_kv_heads, bias=arch.has_bias, dtype=ctx.dtype,
                                      linear_method=ctx.linear_method(f"{prefix}.Wqkv"))
        self.out_proj = RowParallelLinear(arch.hidden_size, arch.hidden_size, bias=arch.has_bias,
                                          dtype=ctx.dtype,
                                          linear_method=ctx.linear_method(f"{prefix}.out_proj"))
        self.q_size, self.kv_size = self.Wqkv.q_size, self.Wqkv.kv_size
        self.clip_qkv = arch.clip_qkv
        self.has_qk_ln = arch.has_qk_ln
        if arch.has_qk_ln:
            if get_tp_size() > 1:
                # The norms span the heads of every rank; sharding them needs a gather.
                raise ValueError("MPT with attn_config.qk_ln=true is not supported with "
                                 f"tensor_parallel_size={get_tp_size()}; use 1.")
            self.q_ln = LayerNorm(arch.num_heads * arch.head_dim, arch.norm_eps, ctx.dtype,
                                  bias=arch.has_bias)
            self.k_ln = LayerNorm(arch.num_kv_heads * arch.head_dim, arch.norm_eps, ctx.dtype,
                                  bias=arch.has_bias)
        slopes = shard_heads(mpt_alibi_slopes(arch.num_heads, arch.alibi_bias_max))
        self.attn = Attention(ctx.attn_backend, self.Wqkv.num_heads, arch.head_dim,
                              self.Wqkv.num_kv_heads, arch.softmax_scale, alibi_slopes=slopes)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.has_qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        out = self.attn(q, k, v, kv_cache, metadata)  # strided views of qkv: no copies
        return self.out_proj(out)


class MptMLP(nn.Module):
    def __init__(self, arch: MptArch, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(arch.hidden_size, arch.ffn_size, bias=arch.has_bias,
                                            dtype=ctx.dtype,
                                            linear_method=ctx.linear_method(f"{prefix}.up_proj"))
        self.down_proj = RowParallelLinear(arch.ffn_size, arch.hidden_size, bias=arch.has_bias,
                                           dtype=ctx.dtype,
                                           linear_method=ctx.linear_method(f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MptBlock(nn.Module):
    """x + attn(norm_1(x)), then + ffn(norm_2(.)); the residual add is fused into the norms."""

    def __init__(self, arch: MptArch, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.norm_1 = LayerNorm(arch.hidden_size, arch.norm_eps, ctx.dtype, bias=arch.has_bias)
        self.attn = MptAttention(arch, ctx, f"{prefix}.attn")
        self.norm_2 = LayerNorm(arch.hidden_size, arch.norm_eps, ctx.dtype, bias=arch.has_bias)
        self.ffn = MptMLP(arch, ctx, f"{prefix}.ffn")

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, metadata: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.norm_1(hidden)
        else:
            hidden, residual = self.norm_1(hidden, residual)
        hidden = self.attn(hidden, kv_cache, metadata)
        hidden, residual = self.norm_2(hidden, residual)
        return self.ffn(hidden), residual


class MptModel(nn.Module):
    def __init__(self, arch: MptArch, ctx: ModelContext) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, ctx.dtype)
        self.blocks = nn.ModuleList(
            MptBlock(arch, ctx, f"transformer.blocks.{i}") for i in range(arch.num_layers))
        self.norm_f = LayerNorm(arch.hidden_size, arch.norm_eps, ctx.dtype, bias=arch.has_bias)

    def forward(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.wte(input_ids)
        residual: Optional[torch.Tensor] = None
        for block, kv_cache in zip(self.blocks, kv_caches):
            hidden, residual = block(hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm_f(hidden, residual)
        return hidden


class MptForCausalLM(CausalLMWithHead):
    """Both ``MptForCausalLM`` (transformers) and ``MPTForCausalLM`` (mosaicml) checkpoints."""

    @classmethod
    def arch_from_hf(cls, cfg: Any) -> MptArch:
        return MptArch.from_hf(cfg)

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.arch = arch = self.arch_from_hf(hf_config)
        self.transformer = MptModel(arch, ctx)
        self._add_lm_head(self.transformer.wte, ctx.dtype)

    def forward(self, input_ids, positions, kv_caches, metadata):
        # ALiBi needs no positions: the backend derives k - p from the block tables.
        return self.transformer(input_ids, kv_caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.arch.logit_scale is not None:
            logits = logits * self.arch.logit_scale
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Wqkv is [q | k | v] along the output.
        q_size = self.arch.num_heads * self.arch.head_dim
        kv_size = self.arch.num_kv_heads * self.arch.head_dim
        return load_with_fused_qkv(
            self, weights, fused="Wqkv", family="MPT",
            split=lambda t: t.split([q_size, kv_size, kv_size], dim=0))
