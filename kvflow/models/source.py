"""Where a model lives: a local folder, a .gguf file or a hub id, resolved to a local folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional


def _config_validation_error() -> type[Exception]:
    """What transformers raises for a config its class rejects (imported only on that path)."""
    try:  # transformers 5 validates configs as strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: validation errors are ValueErrors
        return ValueError
    return StrictDataclassError


@dataclass(frozen=True)
class ModelSource:
    model_dir: str
    tokenizer_dir: Optional[str]
    hf_config: Any
    is_gguf: bool = False


_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def _download(repo_id: str, revision: Optional[str], download_dir: Optional[str],
              allow_bin: bool) -> str:
    from huggingface_hub import snapshot_download

    patterns = list(_WEIGHT_PATTERNS) + (["*.bin"] if allow_bin else [])
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                 allow_patterns=patterns)
    except Exception as exc:  # offline, unknown repo, no network: all user-facing
        raise ValueError(
            f"Model {repo_id!r} is not a local folder or file, and fetching it from the hub "
            f"failed ({type(exc).__name__}: {exc}). Pass a local path, or set HF_HUB_OFFLINE=0 "
            "with network access."
        ) from None


# For these model types kvflow reads config.json itself: importing transformers to parse it
# costs ~9 s of a cold start on the GPU machines (its config module pulls in torchvision and
# torch._dynamo; C1 in benchmarks/RESULTS.md). The values are transformers' own defaults
# (its config classes, 5.x) for every field kvflow's models and engine read, so a field the
# file omits means what it means to transformers; tests/models/test_config_reader.py checks
# both readers build the same model description. Other types go through transformers.
_LLAMA_LIKE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                   num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                   max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                   attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)
_QWEN_LIKE = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, bos_token_id=None, eos_token_id=None)
_NATIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": _QWEN_LIKE,
    "qwen3": {**_QWEN_LIKE, "head_dim": 128, "attention_bias": False},
}


class CheckpointConfig(SimpleNamespace):
    """config.json's fields as attributes, completed with transformers' defaults for its type.

    Stands in for a transformers ``PretrainedConfig`` wherever kvflow reads one
    (attribute access only); nested sections (``rope_scaling``,
    ``quantization_config``) stay plain dicts.
    """


def read_checkpoint_config(raw: dict[str, Any]) -> Optional[CheckpointConfig]:
    """kvflow's own reading of a config.json dict; None for a type it leaves to transformers."""
    defaults = _NATIVE_DEFAULTS.get(raw.get("model_type", ""))
    if defaults is None:
        return None
    values = {**defaults, **raw}
    if values.get("num_key_value_heads") is None:  # an explicit null, as transformers reads it
        values["num_key_value_heads"] = values["num_attention_heads"]
    if "use_sliding_window" in defaults and not values["use_sliding_window"]:
        values["sliding_window"] = None  # Qwen: the window only counts when switched on
    return CheckpointConfig(**values)


def load_transformers_config(model_dir: str) -> Any:
    """transformers' config for the folder; a plain config for model types it does not know.

    Remote-code checkpoints (e.g. Falcon's "RefinedWeb") name model types that
    transformers cannot build without their code, or values its own class of
    that type rejects (mosaicml MPT's ``attn_type="grouped_query_attention"``);
    kvflow reads their fields as is.
    """
    from transformers import AutoConfig, PretrainedConfig

    path = os.path.join(model_dir, "config.json")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError, _config_validation_error()):
        with open(path, encoding="utf-8") as f:
            return PretrainedConfig.from_dict(json.load(f))


def load_hf_config(model_dir: str) -> Any:
    """The model's config: read by kvflow for the types it knows, else by transformers."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} has no config.json; it is not a model folder.")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    native = read_checkpoint_config(raw) if isinstance(raw, dict) else None
    return native if native is not None else load_transformers_config(model_dir)


def resolve_model(model: str, *, revision: Optional[str] = None,
                  download_dir: Optional[str] = None, load_format: str = "auto",
                  tokenizer: Optional[str] = None,
                  skip_tokenizer_init: bool = False) -> ModelSource:
    """Turns the ``model`` argument into a local folder with config.json (and weights)."""
    is_gguf = model.endswith(".gguf")
    if is_gguf:
        if not os.path.isfile(model):
            raise ValueError(f"GGUF file {model!r} does not exist.")
        from kvflow.models.gguf import convert_gguf

        model_dir = convert_gguf(model)
    elif os.path.isdir(model):
        model_dir = model
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"Model path {model!r} does not exist or is not a folder.")
    else:
        model_dir = _download(model, revision, download_dir, allow_bin=True)
    hf_config = load_hf_config(model_dir)
    tokenizer_dir: Optional[str] = None
    if not skip_tokenizer_init:
        tokenizer_dir = tokenizer or model_dir
        if tokenizer and not os.path.isdir(tokenizer):
            tokenizer_dir = _download(tokenizer, None, download_dir, allow_bin=False)
    return ModelSource(model_dir=model_dir, tokenizer_dir=tokenizer_dir, hf_config=hf_config,
                       is_gguf=is_gguf)
