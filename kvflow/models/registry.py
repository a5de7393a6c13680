"""Which kvflow class runs which checkpoint architecture.

kvflow never executes a checkpoint's own Python code: ``trust_remote_code``
is accepted, and the architecture named in config.json picks one of these
implementations.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvflow.models.base import CausalLM, ModelDescription

# architecture name in config.json -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("kvflow.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("kvflow.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("kvflow.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("kvflow.models.qwen3", "Qwen3ForCausalLM"),
    "MptForCausalLM": ("kvflow.models.mpt", "MptForCausalLM"),
    "MPTForCausalLM": ("kvflow.models.mpt", "MptForCausalLM"),
    "FalconForCausalLM": ("kvflow.models.falcon", "FalconForCausalLM"),
    "RWForCausalLM": ("kvflow.models.falcon", "FalconForCausalLM"),
}

# model_type -> architecture, for configs without an ``architectures`` list
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mpt": "MptForCausalLM",
    "falcon": "FalconForCausalLM",
    "RefinedWeb": "RWForCausalLM",
    "RefinedWebModel": "RWForCausalLM",
}


def register_model(architecture: str, module: str, cls_name: str,
                   model_type: str | None = None) -> None:
    """Adds an architecture (model families register themselves here)."""
    _MODELS[architecture] = (module, cls_name)
    if model_type is not None:
        _MODEL_TYPES[model_type] = architecture


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(hf_config: Any) -> str:
    """The first architecture of config.json that kvflow implements, or a ValueError."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            return arch
    model_type = getattr(hf_config, "model_type", None)
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(
        f"Model architecture {archs or model_type!r} is not supported by kvflow. "
        f"Supported architectures: {', '.join(supported_architectures())}."
    )


def get_model_class(architecture: str) -> type[CausalLM]:
    if architecture not in _MODELS:
        raise ValueError(f"Model architecture {architecture!r} is not supported by kvflow. "
                         f"Supported architectures: {', '.join(supported_architectures())}.")
    module, cls_name = _MODELS[architecture]
    return getattr(importlib.import_module(module), cls_name)


def describe_model(architecture: str, hf_config: Any) -> ModelDescription:
    return get_model_class(architecture).describe(hf_config)
