"""Qwen2 / Qwen2.5: Llama's layout with biases on q, k and v (none on o)."""

from __future__ import annotations

from typing import Any

from kvflow.models.llama import LlamaArch, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch_from_hf(cls, cfg: Any) -> LlamaArch:
        return LlamaArch.from_hf(cfg, qkv_bias=True)
