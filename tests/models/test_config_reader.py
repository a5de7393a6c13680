"""kvflow's own config.json reader against transformers' (its slow twin).

For the model types kvflow parses itself (no transformers import on the start
path), every config here must give the same model description, architecture
switches, EOS id and dtype as transformers' config class does: files that
omit fields (as ``save_pretrained`` writes them: only non-defaults) test the
defaults table, full files test that no field is misread.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from kvflow.config import EngineArgs
from kvflow.models.registry import get_model_class, resolve_architecture
from kvflow.models.source import CheckpointConfig, load_hf_config, load_transformers_config

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
                 bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
MISTRAL_7B = dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                  torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
QWEN25_05B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                  intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  max_window_layers=21, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True,
                  torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643)
QWEN3_06B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                 intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 sliding_window=None, use_sliding_window=False, max_window_layers=28,
                 tie_word_embeddings=True, torch_dtype="bfloat16", bos_token_id=151643,
                 eos_token_id=151645)

CONFIGS: dict[str, dict[str, Any]] = {
    # only the type: every field from the defaults table
    "llama-minimal": dict(model_type="llama"),
    "mistral-minimal": dict(model_type="mistral"),
    "qwen2-minimal": dict(model_type="qwen2"),
    "qwen3-minimal": dict(model_type="qwen3"),
    # real checkpoints' files
    "llama3-8b": LLAMA3_8B,
    "llama3.1-8b": {**LLAMA3_8B, "rope_scaling": LLAMA31_ROPE, "eos_token_id": [128001, 128009]},
    "llama2-linear-rope": {**LLAMA3_8B, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama-null-kv-heads": {**LLAMA3_8B, "num_key_value_heads": None, "head_dim": None},
    "mistral-7b": MISTRAL_7B,
    "mistral-no-window": {**MISTRAL_7B, "sliding_window": None},
    "mistral-window-omitted": {k: v for k, v in MISTRAL_7B.items() if k != "sliding_window"},
    "qwen2.5-0.5b": QWEN25_05B,
    "qwen2-sliding-on": {**QWEN25_05B, "use_sliding_window": True, "sliding_window": 64},
    "qwen2-sliding-on-window-omitted": {**{k: v for k, v in QWEN25_05B.items()
                                           if k != "sliding_window"}, "use_sliding_window": True},
    "qwen2-window-flag-omitted": {k: v for k, v in QWEN25_05B.items()
                                  if k != "use_sliding_window"},
    "qwen3-0.6b": QWEN3_06B,
    "qwen3-head-dim-omitted": {k: v for k, v in QWEN3_06B.items() if k != "head_dim"},
    "qwen3-dtype-key": {**{k: v for k, v in QWEN3_06B.items() if k != "torch_dtype"},
                        "dtype": "float16"},
}


def _write(tmp_path, raw: dict) -> str:
    path = str(tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return path


def _summary(cfg: Any) -> dict:
    arch_name = resolve_architecture(cfg)
    cls = get_model_class(arch_name)
    dtype = EngineArgs(model="x")._resolve_dtype(cfg, torch.device("cuda"))
    return dict(arch_name=arch_name, arch=cls.arch_from_hf(cfg), describe=cls.describe(cfg),
                eos=getattr(cfg, "eos_token_id", None), dtype=dtype)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_reader_matches_transformers(tmp_path, name):
    path = _write(tmp_path, CONFIGS[name])
    native = load_hf_config(path)
    assert isinstance(native, CheckpointConfig), "this model type should be read natively"
    assert _summary(native) == _summary(load_transformers_config(path))


@pytest.mark.parametrize("cls_name", ["LlamaConfig", "MistralConfig", "Qwen2Config",
                                      "Qwen3Config"])
def test_save_pretrained_files(tmp_path, cls_name):
    """transformers writes only the fields that differ from its defaults."""
    import transformers

    cfg = getattr(transformers, cls_name)(hidden_size=256, intermediate_size=512,
                                          num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=1000)
    cfg.save_pretrained(str(tmp_path))
    native = load_hf_config(str(tmp_path))
    assert isinstance(native, CheckpointConfig)
    assert _summary(native) == _summary(load_transformers_config(str(tmp_path)))


def test_other_types_go_through_transformers(tmp_path):
    path = _write(tmp_path, dict(model_type="mpt", architectures=["MptForCausalLM"],
                                 d_model=64, n_heads=4, n_layers=2, vocab_size=1000))
    assert not isinstance(load_hf_config(path), CheckpointConfig)
