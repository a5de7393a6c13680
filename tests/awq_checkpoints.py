"""AWQ checkpoints made by the tests: a tiny float checkpoint, quantized and packed in
AutoAWQ's GEMM layout, plus its exact float32 twin for transformers to run.

Shared by tests/quantization and the LangChain seed-snippet test."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from kvflow.quantization import awq_format

_LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class AWQPair:
    awq_dir: str
    """AutoAWQ GEMM layout: qweight/qzeros/scales per quantized linear."""
    dequantized_dir: str
    """The same model with every quantized linear replaced by its exact float32 dequantization."""


def _load_state(model_dir: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(model_dir, name)))
    assert state, f"no safetensors in {model_dir}"
    return state


def _copy_side_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def write_awq_pair(src: str, root: str, *, group_size: Optional[int],
                   modules_to_not_convert: tuple[str, ...] = (),
                   config_location: str = "config.json",
                   key_style: str = "transformers") -> AWQPair:
    """Quantizes every decoder linear of ``src`` (except skipped ones) into two folders.

    ``config_location`` is where the settings go: "config.json" (``quantization_config``)
    or a side file name. ``key_style`` "transformers" writes ``quant_method``, ``bits``
    and ``group_size``; "autoawq" writes AutoAWQ's ``w_bit`` and ``q_group_size`` and no
    method name, as its old ``quant_config.json`` does.
    """
    awq_dir, deq_dir = os.path.join(root, "awq"), os.path.join(root, "dequantized")
    _copy_side_files(src, awq_dir)
    _copy_side_files(src, deq_dir)
    awq_state: dict[str, torch.Tensor] = {}
    deq_state: dict[str, torch.Tensor] = {}
    for name, tensor in _load_state(src).items():
        match = _LINEAR.search(name)
        module = name[: -len(".weight")] if match else None
        if module is None or any(m in module for m in modules_to_not_convert):
            if name.endswith(".bias"):
                tensor = tensor.half()  # AutoAWQ stores biases in float16
            awq_state[name] = tensor.contiguous()
            deq_state[name] = tensor.float().contiguous()
            continue
        qweight, qzeros, scales = awq_format.quantize(tensor, group_size)
        awq_state[f"{module}.qweight"] = qweight
        awq_state[f"{module}.qzeros"] = qzeros
        awq_state[f"{module}.scales"] = scales
        deq_state[name] = awq_format.dequantize(qweight, qzeros, scales, torch.float32)
    save_file(awq_state, os.path.join(awq_dir, "model.safetensors"), metadata={"format": "pt"})
    save_file(deq_state, os.path.join(deq_dir, "model.safetensors"), metadata={"format": "pt"})

    group = -1 if group_size is None else group_size
    cfg_path = os.path.join(awq_dir, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    if key_style == "transformers":
        settings: dict[str, Any] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                    "zero_point": True, "version": "gemm"}
    else:
        settings = {"zero_point": True, "q_group_size": group, "w_bit": 4, "version": "GEMM"}
    if modules_to_not_convert:
        settings["modules_to_not_convert"] = list(modules_to_not_convert)
    if config_location == "config.json":
        config["quantization_config"] = settings
    else:
        with open(os.path.join(awq_dir, config_location), "w", encoding="utf-8") as f:
            json.dump(settings, f)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return AWQPair(awq_dir, deq_dir)


def loaded_gate_up_layer(method: Any, hidden: int, inter: int, group: int,
                         gen: torch.Generator, device: torch.device) -> Any:
    """A MergedColumnParallelLinear [2 * inter, hidden] (gate | up) of random AWQ weights
    loaded shard by shard through its weight loader, moved to ``device`` and processed by
    ``method`` as the model loader does. The caller fixes the tensor-parallel size to 1."""
    from kvflow.layers import linear as linear_layers

    gate, up = (awq_format.quantize(torch.randn(inter, hidden, generator=gen), group)
                for _ in range(2))
    layer = linear_layers.MergedColumnParallelLinear(
        hidden, [inter, inter], linear_method=method, dtype=torch.float16)
    for packed, shard in ((gate, 0), (up, 1)):
        for name, tensor in zip(("qweight", "qzeros", "scales"), packed):
            layer.weight_loader(getattr(layer, name), tensor, shard)
    layer.to(device)  # before processing, as the loader does (repacks are no parameters)
    method.process_weights_after_loading(layer)
    return layer
