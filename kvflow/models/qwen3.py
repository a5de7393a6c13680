"""Qwen3: Llama's layout with an RMSNorm over each head of q and k before the rotary."""

from __future__ import annotations

from typing import Any

from kvflow.models.llama import LlamaArch, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch_from_hf(cls, cfg: Any) -> LlamaArch:
        return LlamaArch.from_hf(cfg, qk_norm=True)
