"""The model creator's sampling defaults from ``generation_config.json``, as vLLM applies them.

vLLM's ``--generation-config auto`` (its default) makes the sampling settings a
checkpoint ships (Llama-3-Instruct: temperature 0.6, top_p 0.9) the defaults of every
request that leaves them unset, offline (``LLM.get_default_sampling_params``) and over
HTTP. kvflow does the same, so a vLLM user gets the same sampling from the same
request: ``"auto"`` reads the model folder's file, a path reads that folder's (or that
file), ``"vllm"`` ignores them (the plain OpenAI/vLLM defaults); vLLM's
``override_generation_config`` (a dict in the file's names) goes on top of either.

Only the settings vLLM takes are read: temperature, top_p, top_k, min_p,
repetition_penalty, and max_new_tokens (as ``max_tokens``). A value of the wrong type
is a ``ValueError`` naming the file and the key, not a failure at the first request.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                 "repetition_penalty": float, "max_new_tokens": int}
"""generation_config.json keys read, with their types."""

RENAMED = {"max_new_tokens": "max_tokens"}
"""generation_config.json names that differ from ``SamplingParams``'."""


def read_generation_defaults(model_dir: str, source: str,
                             overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``SamplingParams`` field -> default, from ``source`` ("auto", "vllm" or a path),
    then ``overrides`` (vLLM's ``override_generation_config``, generation_config.json names)
    on top."""
    defaults = {} if source == "vllm" else _read_file(model_dir, source)
    if overrides:
        defaults.update(_checked(overrides, "override_generation_config"))
    return defaults


def _read_file(model_dir: str, source: str) -> dict[str, Any]:
    if source == "auto":
        path = os.path.join(model_dir, "generation_config.json")
        if not os.path.isfile(path):
            return {}
    else:
        path = os.path.join(source, "generation_config.json") if os.path.isdir(source) else source
        if not os.path.isfile(path):
            raise ValueError(f"generation_config={source!r}: no generation_config.json there. "
                             "Use 'auto' (the model's), 'vllm' (none) or a folder holding one.")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return _checked(config, path)


def _checked(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The sampling keys of ``config``, typed and renamed; a ValueError naming ``where``."""
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a JSON object, got {config!r}.")
    defaults: dict[str, Any] = {}
    for key, kind in SAMPLING_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            article = "an integer" if kind is int else "a number"
            raise ValueError(f"{where}: {key}={value!r} is not {article}; fix it or pass "
                             "generation_config='vllm' to ignore the model's file.")
        defaults[RENAMED.get(key, key)] = kind(value)
    return defaults
