"""Falcon (tiiuae), in all its generations, from transformers' or the original remote-code configs.

    7B style        multi-query (one K/V head), attention and MLP in parallel on one LayerNorm
    40B/180B style  ``new_decoder_architecture``: grouped K/V heads, ``ln_attn`` and ``ln_mlp``
                    (Falcon2-11B: the same with one shared norm, ``num_ln_in_parallel_attn=1``)
    RW-1B/7B style  ALiBi instead of rotary, multi-head, sequential attention then MLP, biases

The original ``RWForCausalLM`` configs name the same fields ``n_head``,
``n_layer`` and ``n_head_kv``; their model type says which code ran them:
"RefinedWeb" is the 40B code (always the new decoder architecture),
"RefinedWebModel" the 7B/RW code. Tensor names are the same in both layouts.

The fused ``query_key_value`` output is grouped by K/V head, for every style:

    [ q_0 .. q_{G-1} k v | q_G .. q_{2G-1} k v | ... ]     G = H / Hkv query heads per group

(Hkv = 1 for multi-query, Hkv = H for multi-head: [q k v] per head). At load
time it is cut into kvflow's [q | k | v] so tensor parallelism can shard heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.distributed.parallel_state import tp_all_reduce
from kvflow.layers.alibi import bloom_alibi_slopes, shard_heads
from kvflow.layers.attention import Attention
from kvflow.layers.embedding import VocabParallelEmbedding
from kvflow.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvflow.layers.norm import LayerNorm
from kvflow.layers.rotary import RopeScaling, RotaryEmbedding
from kvflow.models.base import CausalLMWithHead, ModelContext, get_cfg, load_with_fused_qkv
from kvflow.models.llama import rope_parameters

_REMOTE_CODE_40B = "RefinedWeb"


@dataclass(frozen=True)
class FalconArch:
    vocab_size: int
    hidden_size: int
    ffn_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    is_parallel: bool
    """Attention and MLP both read the block input and are summed (else MLP follows attention)."""
    num_parallel_norms: int
    """With ``is_parallel``: 2 = ``ln_attn`` and ``ln_mlp``; 1 = one shared ``input_layernorm``."""
    has_alibi: bool
    has_bias: bool
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: Any) -> "FalconArch":
        model_type = getattr(cfg, "model_type", None)
        is_rw = model_type in (_REMOTE_CODE_40B, "RefinedWebModel")
        hidden = int(get_cfg(cfg, "hidden_size", "n_embed"))
        num_heads = int(get_cfg(cfg, "num_attention_heads", "n_head"))
        # The RW configs' defaults differ from FalconConfig's; only RW configs omit these keys.
        new_decoder = bool(get_cfg(cfg, "new_decoder_architecture",
                                   default=model_type == _REMOTE_CODE_40B))
        multi_query = bool(get_cfg(cfg, "multi_query", default=not is_rw))
        if new_decoder:
            num_kv_heads = int(get_cfg(cfg, "num_kv_heads", "n_head_kv",
                                       default=1 if multi_query else num_heads))
            # The new decoder is always parallel, whatever parallel_attn says.
            is_parallel = True
            num_norms = int(get_cfg(cfg, "num_ln_in_parallel_attn", default=2))
        else:
            num_kv_heads = 1 if multi_query else num_heads
            is_parallel = bool(get_cfg(cfg, "parallel_attn", default=not is_rw))
            num_norms = 1
        if num_heads % num_kv_heads:
            raise ValueError(f"Falcon num_attention_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}.")
        if get_cfg(cfg, "apply_residual_connection_post_layernorm"):
            raise ValueError("Falcon with apply_residual_connection_post_layernorm=true is not "
                             "supported by kvflow.")
        activation = get_cfg(cfg, "activation", default="gelu")
        if activation != "gelu":
            raise ValueError(f"Falcon activation={activation!r} is not supported (only gelu).")
        theta, scaling = rope_parameters(cfg)
        return cls(
            vocab_size=int(cfg.vocab_size),
            hidden_size=hidden,
            ffn_size=int(get_cfg(cfg, "ffn_hidden_size", default=4 * hidden)),
            num_layers=int(get_cfg(cfg, "num_hidden_layers", "n_layer")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=hidden // num_heads,
            is_parallel=is_parallel,
            num_parallel_norms=num_norms,
            has_alibi=bool(get_cfg(cfg, "alibi", default=False)),
            has_bias=bool(get_cfg(cfg, "bias", default=False)),
            norm_eps=float(get_cfg(cfg, "layer_norm_epsilon", default=1e-5)),
            rope_theta=theta,
            rope_scaling=RopeScaling.from_dict(scaling),
            max_position=int(get_cfg(cfg, "max_position_embeddings", default=2048)),
            tie_word_embeddings=bool(get_cfg(cfg, "tie_word_embeddings", default=True)),
        )

    @property
    def reduces_once(self) -> bool:
        """Parallel blocks sum attention and MLP before one all-reduce (not two).

        Only without biases: each rank's partial sum would otherwise add them again.
        """
        return self.is_parallel and not self.has_bias


def falcon_alibi_slopes(num_heads: int, head_dim: int) -> torch.Tensor:
    """Falcon's effective ALiBi slopes: Bloom's, rounded to bfloat16, over sqrt(head_dim).

    Falcon was trained with bfloat16 slopes and scales the bias together with
    q·k, so the factor the backend multiplies by (k - p) is slope / sqrt(D).

    One difference remains: the reference code also rounds each product
    slope * k to bfloat16, a rounding that depends on the absolute position k
    and so has no per-head slope. It is exact (the same bias as here) for up
    to 8 heads below position 256; beyond that (e.g. falcon-rw-1b's 32 heads)
    kvflow's float32 bias differs from it in the last bfloat16 bits.
    """
    return bloom_alibi_slopes(num_heads).bfloat16().float() / math.sqrt(head_dim)


class FalconAttention(nn.Module):
    def __init__(self, arch: FalconArch, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.query_key_value = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
            bias=arch.has_bias, dtype=ctx.dtype,
            linear_method=ctx.linear_method(f"{prefix}.query_key_value"))
        self.dense = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size,
                                       bias=arch.has_bias, dtype=ctx.dtype,
                                       linear_method=ctx.linear_method(f"{prefix}.dense"),
                                       reduce_results=not arch.reduces_once)
        self.q_size, self.kv_size = self.query_key_value.q_size, self.query_key_value.kv_size
        self.head_dim = arch.head_dim
        self.rotary_emb: Optional[RotaryEmbedding] = None
        slopes: Optional[torch.Tensor] = None
        if arch.has_alibi:
            slopes = shard_heads(falcon_alibi_slopes(arch.num_heads, arch.head_dim))
        else:
            self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.head_dim, arch.max_position,
                                              arch.rope_theta, True, arch.rope_scaling)
        self.attn = Attention(ctx.attn_backend, self.query_key_value.num_heads, arch.head_dim,
                              self.query_key_value.num_kv_heads, 1 / math.sqrt(arch.head_dim),
                              alibi_slopes=slopes)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.query_key_value(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Rotary (when the model has no ALiBi) is applied by the attention layer.
        out = self.attn(q, k, v, kv_cache, metadata,
                        rotary=None if self.rotary_emb is None else (self.rotary_emb, positions))
        return self.dense(out)


class FalconMLP(nn.Module):
    def __init__(self, arch: FalconArch, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            arch.hidden_size, arch.ffn_size, bias=arch.has_bias, dtype=ctx.dtype,
            linear_method=ctx.linear_method(f"{prefix}.dense_h_to_4h"))
        self.dense_4h_to_h = RowParallelLinear(
            arch.ffn_size, arch.hidden_size, bias=arch.has_bias, dtype=ctx.dtype,
            linear_method=ctx.linear_method(f"{prefix}.dense_4h_to_h"),
            reduce_results=not arch.reduces_once)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    """Parallel: x + (mlp(n2(x)) + attn(n1(x))). Sequential: y = x + attn(n1(x)); y + mlp(n2(y)).

    The residual add is fused into the next norm, as in the other families.
    """

    def __init__(self, arch: FalconArch, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.arch = arch
        self.self_attention = FalconAttention(arch, ctx, f"{prefix}.self_attention")
        self.mlp = FalconMLP(arch, ctx, f"{prefix}.mlp")

        def norm() -> LayerNorm:
            return LayerNorm(arch.hidden_size, arch.norm_eps, ctx.dtype)

        self.has_mlp_norm = arch.is_parallel and arch.num_parallel_norms == 2
        if self.has_mlp_norm:
            self.ln_attn, self.ln_mlp = norm(), norm()
        else:
            self.input_layernorm = norm()
            if not arch.is_parallel:
                self.post_attention_layernorm = norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: Optional[torch.Tensor], kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        attn_norm = self.ln_attn if self.has_mlp_norm else self.input_layernorm
        if residual is None:
            residual, attn_in = hidden, attn_norm(hidden)
        else:
            attn_in, residual = attn_norm(hidden, residual)
        attn_out = self.self_attention(positions, attn_in, kv_cache, metadata)
        if not self.arch.is_parallel:
            mlp_in, residual = self.post_attention_layernorm(attn_out, residual)
            return self.mlp(mlp_in), residual
        mlp_in = self.ln_mlp(residual) if self.has_mlp_norm else attn_in
        out = self.mlp(mlp_in) + attn_out
        if self.arch.reduces_once:
            out = tp_all_reduce(out)
        return out, residual


class FalconModel(nn.Module):
    def __init__(self, arch: FalconArch, ctx: ModelContext) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size,
                                                      ctx.dtype)
        self.h = nn.ModuleList(
            FalconDecoderLayer(arch, ctx, f"transformer.h.{i}") for i in range(arch.num_layers))
        self.ln_f = LayerNorm(arch.hidden_size, arch.norm_eps, ctx.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids)
        residual: Optional[torch.Tensor] = None
        for layer, kv_cache in zip(self.h, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden


def split_query_key_value(fused: torch.Tensor, num_heads: int, num_kv_heads: int,
                          head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Falcon's fused weight or bias [(H + 2*Hkv)*D, ...] -> q [H*D, ...], k and v [Hkv*D, ...].

    Query head h of the result sits in K/V group h // G, the head the backend pairs it with.
    """
    rest = fused.shape[1:]
    group = num_heads // num_kv_heads
    grouped = fused.reshape(num_kv_heads, group + 2, head_dim, *rest)
    q = grouped[:, :group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, group].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, group + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


class FalconForCausalLM(CausalLMWithHead):
    """``FalconForCausalLM`` (transformers) and ``RWForCausalLM`` (remote code) checkpoints."""

    @classmethod
    def arch_from_hf(cls, cfg: Any) -> FalconArch:
        return FalconArch.from_hf(cfg)

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.arch = arch = self.arch_from_hf(hf_config)
        self.transformer = FalconModel(arch, ctx)
        self._add_lm_head(self.transformer.word_embeddings, ctx.dtype)

    def forward(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        arch = self.arch
        return load_with_fused_qkv(
            self, weights, fused="query_key_value", family="Falcon",
            split=lambda t: split_query_key_value(t, arch.num_heads, arch.num_kv_heads,
                                                  arch.head_dim))
