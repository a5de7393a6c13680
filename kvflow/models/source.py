"""Where a model lives: a local folder, a .gguf file or a hub id, resolved to a local folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

try:  # transformers 5 validates configs as strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _ConfigValidationError
except ImportError:  # older huggingface_hub: validation errors are ValueErrors
    _ConfigValidationError = ValueError  # type: ignore[assignment, misc]


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


def load_hf_config(model_dir: str) -> Any:
    """transformers' config for the folder; a plain config for model types it does not know.

    Remote-code checkpoints (e.g. Falcon's "RefinedWeb") name model types that
    transformers cannot build without their code, or values its own class of
    that type rejects (mosaicml MPT's ``attn_type="grouped_query_attention"``);
    kvflow reads their fields as is.
    """
    from transformers import AutoConfig, PretrainedConfig

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} has no config.json; it is not a model folder.")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError, _ConfigValidationError):
        with open(path, encoding="utf-8") as f:
            return PretrainedConfig.from_dict(json.load(f))


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
