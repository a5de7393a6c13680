"""What every model implementation receives and provides."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from kvflow.attention.backends.base import BaseAttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kvflow.layers.linear import LinearMethod


@dataclass(frozen=True)
class ModelContext:
    """Construction-time inputs shared by every layer of a model."""

    dtype: torch.dtype
    attn_backend: BaseAttentionBackend
    linear_method: Callable[[str], Optional[LinearMethod]] = lambda prefix: None
    """Quantization hook: the method for the linear layer at ``prefix`` (None = plain)."""


@dataclass(frozen=True)
class ModelDescription:
    """The few numbers the engine needs before building the model (cache sizing, TP checks)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: Optional[int]


def get_cfg(cfg: Any, *names: str, default: Any = None) -> Any:
    """First attribute of ``cfg`` among ``names`` that is set (checkpoints disagree on names)."""
    for name in names:
        value = getattr(cfg, name, None)
        if value is None and isinstance(cfg, dict):
            value = cfg.get(name)
        if value is not None:
            return value
    return default


class CausalLM(nn.Module):
    """A decoder-only model over flat token batches and a paged KV cache."""

    @classmethod
    @abstractmethod
    def describe(cls, hf_config: Any) -> ModelDescription: ...

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        """Returns the final hidden states [T, hidden]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, V] for the N rows of ``hidden`` to sample from."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors (HF names) into the parameters; returns those loaded."""


class CausalLMWithHead(CausalLM):
    """A family's decoder stack under a vocabulary head: the wrapper every family shares.

    A subclass reads its frozen arch in ``arch_from_hf``. Its constructor stores
    that arch as ``self.arch``, builds the stack under the checkpoint's name for
    it (``model``, ``transformer``: parameter names are checkpoint names, so the
    stack cannot move to a common attribute), then calls ``_add_lm_head``.
    ``forward`` and ``load_weights`` stay with the family: what the stack reads
    (positions, or none under ALiBi) and how a checkpoint stores q, k and v differ.
    """

    arch: Any
    """Read here: ``vocab_size``, ``hidden_size``, ``tie_word_embeddings`` and
    the ``ModelDescription`` fields (``max_position`` for its last)."""

    @classmethod
    @abstractmethod
    def arch_from_hf(cls, cfg: Any) -> Any:
        """The family's frozen arch, read once from the HF config."""

    @classmethod
    def describe(cls, hf_config: Any) -> ModelDescription:
        arch = cls.arch_from_hf(hf_config)
        return ModelDescription(arch.num_layers, arch.num_heads, arch.num_kv_heads,
                                arch.head_dim, arch.vocab_size, arch.max_position)

    def _add_lm_head(self, embedding: VocabParallelEmbedding, dtype: torch.dtype) -> None:
        """Adds ``lm_head`` (sharing ``embedding``'s weight if the arch ties them), then
        gives every parameter its weight loader.

        Last in the constructor: ``bind_weight_loaders`` only sees the parameters
        that exist by then.
        """
        self.lm_head = ParallelLMHead(self.arch.vocab_size, self.arch.hidden_size, dtype)
        if self.arch.tie_word_embeddings:
            self.lm_head.tie_to(embedding)
        bind_weight_loaders(self)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)


def load_by_name(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 stacked: list[tuple[str, str, Any]],
                 rename: Callable[[str], Optional[str]] = lambda n: n) -> set[str]:
    """The loading loop every model shares.

    ``stacked`` maps checkpoint sub-names to fused parameters: a tuple
    ("qkv_proj", "q_proj", "q") says ``...q_proj.weight`` goes into the "q"
    shard of ``...qkv_proj.weight``. ``rename`` maps a checkpoint name to the
    parameter name (None skips it). Names that match no parameter are skipped: rotary
    buffers, and a tied ``lm_head.weight`` (the head shares the embedding's parameter,
    which ``named_parameters`` lists once, under the embedding's name).
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        name = rename(ckpt_name)
        if name is None:
            continue
        for fused, part, shard_id in stacked:
            if f".{part}." in name:
                target = name.replace(f".{part}.", f".{fused}.")
                if target in params:
                    param = params[target]
                    param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
                    loaded.add(target)
                    break
        else:
            if name not in params:
                continue
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor)
            else:
                if param.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {ckpt_name} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(param.shape)}.")
                param.data.copy_(tensor)
            loaded.add(name)
    return loaded


def load_with_fused_qkv(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], *,
                        fused: str, split: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                        family: str) -> set[str]:
    """``load_by_name`` for checkpoints that store q, k and v as one tensor (MPT, Falcon).

    Each ``...{fused}.weight`` / ``.bias`` is cut by ``split`` into its q, k and v
    parts, which load as the three shards of the model's ``{fused}`` parameter
    (so each tensor-parallel rank takes its own heads of each part).
    """
    def parts() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if f".{fused}." not in name:
                yield name, tensor
                continue
            if not name.endswith((".weight", ".bias")):
                raise ValueError(f"Checkpoint tensor {name!r}: kvflow splits {family}'s fused "
                                 f"{fused} only for unquantized weights.")
            for shard, part in zip("qkv", split(tensor)):
                yield name.replace(f".{fused}.", f".{fused}_{shard}."), part

    stacked = [(fused, f"{fused}_{s}", s) for s in "qkv"]
    return load_by_name(model, parts(), stacked)


def bind_weight_loaders(model: nn.Module) -> None:
    """Gives each parameter the loader of the module that owns it (sharding-aware)."""
    for module in model.modules():
        loader = getattr(module, "weight_loader", None)
        if loader is None:
            continue
        for param in module.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                param.weight_loader = loader  # type: ignore[attr-defined]
