"""Llama 2/3 and Mistral (and, through small subclasses, Qwen2 and Qwen3).

One decoder layer serves the whole family; the differences are switches of a
frozen ``LlamaArch`` read once from the HF config: qkv bias (Qwen2), q/k RMS
norms over the head (Qwen3), per-layer sliding windows (Mistral, Qwen), rope
scaling (Llama 3) and tied embeddings (Llama 3.2, Qwen small models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from kvflow.attention.metadata import AttentionMetadata
from kvflow.layers.activation import SiluAndMul
from kvflow.layers.attention import Attention
from kvflow.layers.embedding import VocabParallelEmbedding
from kvflow.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RopeScaling, RotaryEmbedding
from kvflow.models.base import CausalLMWithHead, ModelContext, get_cfg, load_by_name


def rope_parameters(cfg: Any) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict) from either the transformers 4 or 5 config layout."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", get_cfg(cfg, "rope_theta", default=10000.0)))
        return theta, params
    return float(get_cfg(cfg, "rope_theta", default=10000.0)), getattr(cfg, "rope_scaling", None)


@dataclass(frozen=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[Optional[int], ...] = ()

    @classmethod
    def from_hf(cls, cfg: Any, *, qkv_bias: Optional[bool] = None, qk_norm: bool = False
                ) -> "LlamaArch":
        act = get_cfg(cfg, "hidden_act", default="silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported for this family (only silu).")
        num_heads = cfg.num_attention_heads
        hidden = cfg.hidden_size
        num_layers = cfg.num_hidden_layers
        theta, scaling = rope_parameters(cfg)
        attention_bias = bool(get_cfg(cfg, "attention_bias", default=False))
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=hidden,
            intermediate_size=cfg.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=get_cfg(cfg, "num_key_value_heads", default=num_heads),
            head_dim=get_cfg(cfg, "head_dim", default=hidden // num_heads),
            rms_norm_eps=float(get_cfg(cfg, "rms_norm_eps", default=1e-6)),
            rope_theta=theta,
            rope_scaling=RopeScaling.from_dict(scaling),
            max_position=int(get_cfg(cfg, "max_position_embeddings", default=4096)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
            o_bias=attention_bias if qkv_bias is None else False,
            mlp_bias=bool(get_cfg(cfg, "mlp_bias", default=False)),
            qk_norm=qk_norm,
            sliding_windows=sliding_windows(cfg, num_layers),
        )


def sliding_windows(cfg: Any, num_layers: int) -> tuple[Optional[int], ...]:
    """The attention window of each layer, None for full attention."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if window is None:
        return (None,) * num_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    use = getattr(cfg, "use_sliding_window", None)
    if use is False:
        return (None,) * num_layers
    if use is True:
        first = getattr(cfg, "max_window_layers", 0)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window,) * num_layers  # Mistral: every layer


class LlamaAttention(nn.Module):
    def __init__(self, arch: LlamaArch, layer_idx: int, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads,
                                          arch.num_kv_heads, bias=arch.qkv_bias, dtype=ctx.dtype,
                                          linear_method=ctx.linear_method(f"{prefix}.qkv_proj"))
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size,
                                        bias=arch.o_bias, dtype=ctx.dtype,
                                        linear_method=ctx.linear_method(f"{prefix}.o_proj"))
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.head_dim = arch.head_dim
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, ctx.dtype)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, ctx.dtype)
        self.qk_norm = arch.qk_norm
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.head_dim, arch.max_position,
                                          arch.rope_theta, True, arch.rope_scaling)
        self.attn = Attention(ctx.attn_backend, self.qkv_proj.num_heads, arch.head_dim,
                              self.qkv_proj.num_kv_heads, arch.head_dim ** -0.5,
                              sliding_window=arch.sliding_windows[layer_idx]
                              if arch.sliding_windows else None)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, -1, self.head_dim)  # [T, H, D]
        k = k.reshape(num_tokens, -1, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # Rotary is applied by the attention layer (inside the KV-cache write on GPU).
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v, kv_cache,
                        metadata, rotary=(self.rotary_emb, positions))
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, arch: LlamaArch, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            arch.hidden_size, [arch.intermediate_size] * 2, bias=arch.mlp_bias, dtype=ctx.dtype,
            linear_method=ctx.linear_method(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size,
                                           bias=arch.mlp_bias, dtype=ctx.dtype,
                                           linear_method=ctx.linear_method(f"{prefix}.down_proj"))
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = self.down_proj.forward_silu_mul(gate_up)  # one kernel where the method can
        return fused if fused is not None else self.down_proj(self.act(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch, layer_idx: int, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_idx, ctx, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(arch, ctx, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ctx.dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ctx.dtype)

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: LlamaArch, ctx: ModelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, ctx.dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, i, ctx, f"model.layers.{i}") for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ctx.dtype)

    def forward(self, input_ids, positions, kv_caches, metadata):
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLMWithHead):
    """Llama 2/3 and Mistral; Qwen2/Qwen3 subclass it with their switches."""

    # Checkpoint sub-names fused into one parameter: (fused, part, shard id).
    stacked_params = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    @classmethod
    def arch_from_hf(cls, cfg: Any) -> LlamaArch:
        return LlamaArch.from_hf(cfg)

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.arch = arch = self.arch_from_hf(hf_config)
        self.model = LlamaModel(arch, ctx)
        self._add_lm_head(self.model.embed_tokens, ctx.dtype)

    def forward(self, input_ids, positions, kv_caches, metadata):
        return self.model(input_ids, positions, kv_caches, metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A tied head's "lm_head.weight" and rotary buffers are no parameters here:
        # load_by_name skips checkpoint names that match none.
        return load_by_name(self, weights, self.stacked_params)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's layout with a sliding attention window on every layer."""
