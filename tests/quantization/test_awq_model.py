"""AWQ checkpoints end to end on CPU: greedy tokens equal transformers' on the exactly
dequantized weights; fused and tensor-parallel loading of packed tensors; every refusal."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

import tiny_models
from kvflow import LLM, SamplingParams
from kvflow.layers import linear as linear_layers
from kvflow.quantization import awq_format
from kvflow.quantization.awq import AWQConfig, AWQLinearMethod
from kvflow.quantization.detect import CheckpointQuantConfig

NEW_TOKENS = 10


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(5, 400) for _ in range(n - 1)] for n in (1, 4, 19, 45)]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _model(llm: LLM) -> torch.nn.Module:
    return llm.llm_engine.executor.worker.model


# ------------------------------------------------------------------ end to end

@pytest.mark.parametrize("family,group_size,kwargs", [
    ("llama", 32, {}),
    # AutoAWQ's old side file: w_bit / q_group_size and no method name.
    ("llama", None, {"config_location": "quant_config.json", "key_style": "autoawq"}),
    ("llama", 64, {"modules_to_not_convert": ("mlp.down_proj",)}),
    # qkv bias and tied embeddings; settings in quantize_config.json.
    ("qwen2", 32, {"config_location": "quantize_config.json"}),
])
def test_greedy_matches_transformers_on_dequantized(awq_pair, family, group_size, kwargs):
    pair = awq_pair(family, group_size, **kwargs)
    prompts = _prompts()
    expected = tiny_models.hf_greedy(pair.dequantized_dir, prompts, NEW_TOKENS)
    llm = LLM(pair.awq_dir, max_model_len=128)
    assert llm.llm_engine.config.model_config.quantization == "awq"
    assert _greedy(llm, prompts) == expected

    params = dict(_model(llm).named_parameters())
    skipped = kwargs.get("modules_to_not_convert", ())
    layer = "model.layers.0"
    assert f"{layer}.self_attn.qkv_proj.qweight" in params
    assert f"{layer}.mlp.gate_up_proj.qweight" in params
    if skipped:
        assert f"{layer}.mlp.down_proj.weight" in params
        assert f"{layer}.mlp.down_proj.qweight" not in params
    else:
        assert f"{layer}.mlp.down_proj.qweight" in params


def test_quantized_run_differs_from_float_model(awq_pair, checkpoint):
    """Guards the test above: quantization changes this model's greedy tokens, so
    equality with the dequantized model is evidence, not a coincidence."""
    pair = awq_pair("llama", 32)
    prompts = _prompts()
    assert (tiny_models.hf_greedy(pair.dequantized_dir, prompts, NEW_TOKENS)
            != tiny_models.hf_greedy(checkpoint("llama"), prompts, NEW_TOKENS))


# ------------------------------------------------------------------ selection errors

def _edit_config_in_place(path: str, **changes) -> None:
    """Sets (or, with None, removes) top-level keys of ``path``/config.json."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(config, f)


def _edit_config(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    _edit_config_in_place(dst, **changes)
    return dst


def test_awq_requested_on_unquantized_checkpoint(checkpoint):
    with pytest.raises(ValueError, match="holds unquantized weights"):
        LLM(checkpoint("llama"), quantization="awq")


def test_conflicting_method(checkpoint, tmp_path):
    path = _edit_config(checkpoint("llama"), str(tmp_path / "gptq"),
                        quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="conflicts with the checkpoint, which is quantized "
                                         "with 'gptq'"):
        LLM(path, quantization="awq")
    with pytest.raises(ValueError, match="quantized with 'gptq'.*does not support"):
        LLM(path)


def test_gemv_layout_is_refused(awq_pair, tmp_path):
    pair = awq_pair("llama", 32)
    settings = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                "version": "gemv"}
    path = _edit_config(pair.awq_dir, str(tmp_path / "gemv"), quantization_config=settings)
    with pytest.raises(ValueError, match="GEMV layout.*Re-export it with AutoAWQ version='GEMM'"):
        LLM(path)


def test_unnamed_side_file_needs_the_method(awq_pair, tmp_path):
    pair = awq_pair("llama", 32)
    path = _edit_config(pair.awq_dir, str(tmp_path / "unnamed"), quantization_config=None)
    with open(os.path.join(path, "quantize_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bits": 4, "group_size": 32}, f)
    with pytest.raises(ValueError, match="do not name their method"):
        LLM(path)
    llm = LLM(path, quantization="awq", max_model_len=64)
    assert llm.llm_engine.config.model_config.quantization == "awq"


# ------------------------------------------------------------------ config parsing

def _config(values: dict, source: str = "quant_config.json") -> AWQConfig:
    return AWQConfig.from_checkpoint_config(CheckpointQuantConfig("awq", values, source))


def test_config_aliases_and_defaults():
    assert _config({"w_bit": 4, "q_group_size": 64, "zero_point": True,
                    "version": "GEMM"}).group_size == 64
    assert _config({"bits": 4, "group_size": -1}).group_size is None
    assert _config({}).group_size == 128  # AutoAWQ's default


@pytest.mark.parametrize("values,message", [
    ({"bits": 8}, "bits=8.*4-bit AWQ only"),
    ({"group_size": 256}, "group_size=256 .*not supported"),
    ({"zero_point": False}, "zero_point=false"),
    ({"version": "GEMV_FAST"}, "GEMV_FAST layout"),
    ({"version": "marlin"}, "version='marlin'.*not supported"),
])
def test_config_refusals(values, message):
    with pytest.raises(ValueError, match=message):
        _config(values)


def test_modules_to_not_convert_matching():
    cfg = _config({"modules_to_not_convert": ["mlp.down_proj", "self_attn"]})
    assert cfg.is_skipped("model.layers.3.mlp.down_proj")
    assert cfg.is_skipped("model.layers.3.self_attn.qkv_proj")
    assert cfg.is_skipped("model.layers.3.self_attn.o_proj")
    assert not cfg.is_skipped("model.layers.3.mlp.gate_up_proj")
    # Only one part of a fused layer unquantized: cannot be fused, refused by name.
    cfg = _config({"modules_to_not_convert": ["v_proj"]})
    with pytest.raises(ValueError, match="v_proj.*q_proj.*qkv_proj"):
        cfg.is_skipped("model.layers.0.self_attn.qkv_proj")


# ------------------------------------------------------------------ packed sharding

@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("tp_size", [1, 2])
def test_fused_and_sharded_loading_of_packed_tensors(monkeypatch, group_size, tp_size):
    """Each rank's packed slice dequantizes to exactly that rank's slice of the fused,
    unquantized weight, for QKV (GQA), gate/up and row-parallel layers."""
    hidden, head_dim, num_heads, num_kv_heads, inter = 64, 16, 4, 2, 128
    gen = torch.Generator().manual_seed(0)
    method = AWQLinearMethod(AWQConfig(group_size=group_size))

    def checkpoint(num_out: int, num_in: int):
        weight = torch.randn(num_out, num_in, generator=gen)
        packed = awq_format.quantize(weight, group_size)
        return packed, awq_format.dequantize(*packed)

    q, k, v = checkpoint(64, hidden), checkpoint(32, hidden), checkpoint(32, hidden)
    gate, up = checkpoint(inter, hidden), checkpoint(inter, hidden)
    down = checkpoint(hidden, inter)
    for rank in range(tp_size):
        monkeypatch.setattr(linear_layers, "get_tp_size", lambda: tp_size)
        monkeypatch.setattr(linear_layers, "get_tp_rank", lambda rank=rank: rank)
        qkv = linear_layers.QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads,
                                              linear_method=method)
        gate_up = linear_layers.MergedColumnParallelLinear(hidden, [inter, inter],
                                                           linear_method=method)
        row = linear_layers.RowParallelLinear(inter, hidden, linear_method=method)
        for layer, parts in ((qkv, [(q, "q"), (k, "k"), (v, "v")]),
                             (gate_up, [(gate, 0), (up, 1)]), (row, [(down, None)])):
            for (packed, _), shard in parts:
                for name, tensor in zip(("qweight", "qzeros", "scales"), packed):
                    layer.weight_loader(getattr(layer, name), tensor, shard)
            method.process_weights_after_loading(layer)
        kv_rows = 32 // tp_size
        expected_qkv = torch.cat([q[1].chunk(tp_size)[rank], k[1][rank * kv_rows:][:kv_rows],
                                  v[1][rank * kv_rows:][:kv_rows]])
        assert torch.equal(qkv.dequantized_weight, expected_qkv)
        expected_gate_up = torch.cat([gate[1].chunk(tp_size)[rank], up[1].chunk(tp_size)[rank]])
        assert torch.equal(gate_up.dequantized_weight, expected_gate_up)
        assert torch.equal(row.dequantized_weight, down[1].chunk(tp_size, dim=1)[rank])
        # apply() multiplies by that weight.
        x = torch.randn(3, hidden, generator=gen)
        assert torch.equal(qkv(x), torch.nn.functional.linear(x, expected_qkv))


def test_unpackable_shard_is_refused(monkeypatch):
    monkeypatch.setattr(linear_layers, "get_tp_size", lambda: 4)
    monkeypatch.setattr(linear_layers, "get_tp_rank", lambda: 0)
    method = AWQLinearMethod(AWQConfig(group_size=32))
    with pytest.raises(ValueError, match="multiples of 8"):
        linear_layers.MergedColumnParallelLinear(64, [48, 48], linear_method=method)
    with pytest.raises(ValueError, match="not a multiple of the AWQ group_size=32"):
        linear_layers.RowParallelLinear(64, 64, linear_method=method)
