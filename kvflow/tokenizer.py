"""Tokenizer loading (transformers) and the end-of-sequence ids a model stops on."""

from __future__ import annotations

import json
import os
from typing import Any, Optional


_PLAIN_FAST_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
"""tokenizer_config.json's names for transformers' generic fast tokenizer (4.x, 5.x)."""

_PLAIN_FAST_MODEL_TYPES = frozenset({"llama", "mistral", "qwen3", "mpt", "falcon"})
"""config.json model types for which AutoTokenizer keeps a generic class the folder declares.
Not qwen2: transformers 5 loads ``Qwen2Tokenizer`` for it whatever tokenizer_config.json
says. Other types are left to AutoTokenizer, whose per-type rules change between versions."""


def load_tokenizer(path: Optional[str], *, trust_remote_code: bool = False) -> Any:
    """A transformers fast tokenizer for the folder (no remote code is ever run).

    ``AutoTokenizer`` imports transformers' config machinery, which pulls in
    torch.distributed.tensor, sympy and accelerate: seconds of start-up, more
    where nothing is byte-compiled yet. A folder that declares the generic fast
    tokenizer (see ``is_plain_fast_tokenizer``) is loaded by that class
    directly, which is what AutoTokenizer would return for it; everything else
    goes through AutoTokenizer (tests/test_tokenizer_fast.py compares the two).
    """
    if path is None:
        return None
    if is_plain_fast_tokenizer(path):
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(path)
        except Exception:  # AutoTokenizer then fails (or succeeds) on its own terms
            pass
    return _load_auto_tokenizer(path)


def is_plain_fast_tokenizer(path: str) -> bool:
    """True for a local folder whose tokenizer AutoTokenizer would load as the generic class.

    That is: tokenizer.json is there, tokenizer_config.json names the generic
    fast class and maps no custom code, no Mistral ``tekken.json`` competes, and
    config.json (if any) is of a type in ``_PLAIN_FAST_MODEL_TYPES`` without
    remote code.
    """
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json"))
            and not os.path.exists(os.path.join(path, "tekken.json"))):
        return False
    tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
    if (tokenizer_config is None or "auto_map" in tokenizer_config
            or tokenizer_config.get("tokenizer_class") not in _PLAIN_FAST_CLASSES):
        return False
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        return True  # AutoTokenizer then goes by tokenizer_config.json alone
    config = _read_json(config_path)
    return (config is not None and "auto_map" not in config
            and config.get("model_type") in _PLAIN_FAST_MODEL_TYPES)


def _read_json(path: str) -> Optional[dict[str, Any]]:
    """The file's JSON object; None if it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _load_auto_tokenizer(path: str) -> Any:
    """``AutoTokenizer``, retried with kvflow's reading of config.json if its own fails."""
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
