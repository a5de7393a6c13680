"""Tokenizer loading (transformers) and the end-of-sequence ids a model stops on."""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def load_tokenizer(path: Optional[str], *, trust_remote_code: bool = False) -> Any:
    """A transformers fast tokenizer for the folder (no remote code is ever run)."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        error = exc
    # transformers reads config.json to pick the tokenizer class, and its strict config
    # classes reject some remote-code configs (mosaicml MPT's grouped-query attn_type);
    # retry with the config as kvflow reads it.
    if os.path.isfile(os.path.join(path, "config.json")):
        from kvflow.models.source import load_transformers_config

        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                 config=load_transformers_config(path))
        except Exception:
            pass
    raise ValueError(f"Could not load a tokenizer from {path!r} ({type(error).__name__}: {error}). "
                     "Pass tokenizer=..., or skip_tokenizer_init=True with token-id prompts.")


def eos_token_ids(tokenizer: Any, model_dir: str, hf_config: Any) -> set[int]:
    """EOS ids from the tokenizer, generation_config.json and config.json, merged."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    if tokenizer is not None and tokenizer.eos_token_id is not None:
        add(tokenizer.eos_token_id)
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            add(json.load(f).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    return ids
