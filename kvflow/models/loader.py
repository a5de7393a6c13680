"""Builds a model and fills its weights: safetensors (sharded or not), .bin, or random."""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterator

import torch

from kvflow.config import ModelConfig
from kvflow.models.base import CausalLM, ModelContext
from kvflow.models.registry import get_model_class

logger = logging.getLogger("kvflow")


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def iterate_checkpoint(model_dir: str, load_format: str = "auto"
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) pairs from the folder's safetensors, else its .bin files."""
    files = _safetensors_files(model_dir) if load_format in ("auto", "safetensors", "gguf") else []
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    if load_format == "safetensors":
        raise ValueError(f"No *.safetensors file in {model_dir!r} (load_format='safetensors').")
    bins = sorted(p for p in glob.glob(os.path.join(model_dir, "*.bin"))
                  if "training_args" not in p)
    if not bins:
        raise ValueError(f"No weights (*.safetensors or *.bin) in {model_dir!r}. "
                         "Use load_format='dummy' for random weights.")
    for path in bins:
        state = torch.load(path, map_location="cpu", weights_only=True)
        yield from state.items()


def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Small random weights (norms stay 1): real shapes for benchmarks, no checkpoint needed."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            continue
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        gen = gens.get(param.device)
        if gen is None:  # drawn on the parameter's device: no 8B-parameter detour through host
            gen = gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.data.uniform_(-0.02, 0.02, generator=gen)


def load_model(model_config: ModelConfig, ctx: ModelContext, device: torch.device) -> CausalLM:
    """Constructs the architecture's class on ``device`` and loads (or draws) its weights."""
    cls = get_model_class(model_config.architecture)
    with torch.device(device):
        model = cls(model_config.hf_config, ctx)
    if model_config.load_format == "dummy":
        _init_dummy(model, model_config.seed)
    else:
        loaded = model.load_weights(iterate_checkpoint(model_config.model, model_config.load_format))
        missing = sorted(set(n for n, _ in model.named_parameters()) - loaded)
        if missing:
            raise ValueError(f"Checkpoint {model_config.model!r} lacks weights for "
                             f"{len(missing)} parameters, e.g. {missing[:5]}.")
    for module in model.modules():
        method = getattr(module, "method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
    return model.eval()
