"""Where a checkpoint says how it is quantized.

Current exporters put a ``quantization_config`` dict into config.json. Older
ones wrote a file beside it instead: AutoAWQ ``quant_config.json`` (keys
``w_bit``, ``q_group_size``, ``zero_point``, ``version``, and no method
name), AutoGPTQ ``quantize_config.json``. Both the config resolution
(``kvflow.config``) and the AWQ linear method read the settings through
``find_quant_config``, so they cannot disagree about what a checkpoint holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

SIDE_FILES = ("quant_config.json", "quantize_config.json")
"""Files beside config.json that older exporters wrote, in the order they are tried."""

# Keys that name the exporter when a side file does not say ``quant_method``.
_AWQ_KEYS = frozenset({"w_bit", "q_group_size", "zero_point", "version"})
_GPTQ_KEYS = frozenset({"desc_act", "sym", "damp_percent", "static_groups", "true_sequential"})


@dataclass(frozen=True)
class CheckpointQuantConfig:
    """The quantization settings a checkpoint carries, as written."""

    method: Optional[str]
    """Lower-cased method name (``quant_method``, or inferred from a side file's keys);
    None when the settings do not say which method wrote them."""
    values: Mapping[str, Any] = field(repr=False)
    """The raw settings, with the exporter's key names."""
    source: str = "config.json"
    """Where they were read, for error messages."""


def _as_dict(qcfg: Any) -> dict[str, Any]:
    if isinstance(qcfg, Mapping):
        return dict(qcfg)
    to_dict = getattr(qcfg, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return dict(vars(qcfg))


def _infer_method(values: Mapping[str, Any]) -> Optional[str]:
    method = values.get("quant_method")
    if method is not None:
        return str(method).lower()
    keys = set(values)
    if keys & _AWQ_KEYS:
        return "awq"
    if keys & _GPTQ_KEYS:
        return "gptq"
    return None


def find_quant_config(hf_config: Any, model_dir: Optional[str]) -> Optional[CheckpointQuantConfig]:
    """config.json's ``quantization_config``, else the first side file found; None if neither."""
    qcfg = getattr(hf_config, "quantization_config", None)
    if qcfg is not None:
        values = _as_dict(qcfg)
        return CheckpointQuantConfig(_infer_method(values), values,
                                     "config.json (quantization_config)")
    if model_dir is None or not os.path.isdir(model_dir):
        return None
    for name in SIDE_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it.") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} holds a {type(values).__name__}, not a JSON object of "
                             "quantization settings; fix or remove it.")
        return CheckpointQuantConfig(_infer_method(values), values, name)
    return None
