"""MPT: greedy equality with transformers, and mosaicml's original remote-code checkpoints.

transformers' ``MptForCausalLM`` is the oracle for what it implements (ALiBi
with power-of-two and other head counts, ``clip_qkv``, tied embeddings). For
what only mosaicml's code implements (grouped and multi-query K/V heads,
``qk_ln``, biases, ``expansion_ratio`` != 4) the oracle is a plain-torch
forward written here from mosaicml's definitions. Everything runs in float32
on CPU, several prompt lengths in one batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from kvflow import LLM

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, MptConfig  # noqa: E402

NEW_TOKENS = 12
PROMPT_LENS = [1, 3, 17, 40, 60]
MAX_LEN = 128

# name -> (n_heads, attn_config overrides); d_model = 16 per head
VARIANTS = {
    "heads4": (4, {}),
    "heads6": (6, {}),  # 6 is not a power of two: the interleaved slope schedule
    "clip_qkv": (4, {"clip_qkv": 0.3}),
}


@pytest.fixture(scope="module")
def vocab(tokenizer_dir: str) -> int:
    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def _mpt_config(vocab: int, n_heads: int, attn_config: dict) -> MptConfig:
    return MptConfig(vocab_size=vocab, d_model=16 * n_heads, n_heads=n_heads, n_layers=2,
                     max_seq_len=MAX_LEN, attn_config=attn_config, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def references(tmp_path_factory, tokenizer_dir, vocab):
    """variant -> (checkpoint folder, prompts, transformers' greedy tokens), made once."""
    return tiny_models.greedy_references(
        lambda v: tmp_path_factory.mktemp(f"mpt-{v}"), tokenizer_dir,
        lambda v: _mpt_config(vocab, *VARIANTS[v]),
        tiny_models.random_prompts(vocab, PROMPT_LENS), NEW_TOKENS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(variant, references):
    path, prompts, expected = references(variant)
    llm = LLM(path, max_model_len=MAX_LEN)
    # Then again from the prefix cache; ALiBi must see the same distances (60-token prompt: 3 full blocks cached).
    tiny_models.check_greedy_twice(llm, prompts, expected, NEW_TOKENS, min_cached=48)


def test_clip_qkv_is_active(references):
    """The clip variant is only a test of clipping if clipping changes the tokens."""
    path, prompts, expected = references("clip_qkv")
    unclipped = os.path.join(os.path.dirname(path), "unclipped")
    shutil.copytree(path, unclipped)
    with open(os.path.join(unclipped, "config.json")) as f:
        cfg = json.load(f)
    cfg["attn_config"]["clip_qkv"] = None
    with open(os.path.join(unclipped, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert tiny_models.hf_greedy(unclipped, prompts, NEW_TOKENS) != expected


def test_greedy_under_preemption_and_chunking(references):
    path, prompts, expected = references("heads6")
    # 8 blocks x 16 = one max_model_len for five requests that need ~180 tokens: preemption;
    # a 16-token budget splits every long prompt into chunks.
    llm = LLM(path, max_model_len=MAX_LEN, num_gpu_blocks_override=8,
              max_num_batched_tokens=16, block_size=16)
    assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected
    sched = llm.llm_engine.scheduler
    assert sched.num_preemptions > 0
    assert sched.kv_cache_manager.num_free_blocks == 8
    sched.check_integrity()


def test_tensor_parallel_greedy_matches_transformers(references):
    """tp=2 over CPU processes: 3 heads a rank, each with its own slice of the 6 slopes."""
    path, prompts, expected = references("heads6")
    llm = LLM(path, max_model_len=MAX_LEN, tensor_parallel_size=2, device="cpu")
    try:
        assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected
    finally:
        llm.llm_engine.shutdown()


# --------------------------------------------------------------------------- mosaicml layout


def _mosaicml_config(vocab: int, d_model: int, n_heads: int, attn_config: dict,
                     **overrides) -> dict:
    """config.json as mosaicml's remote-code MPTConfig writes it (attn_config a plain dict).

    ``attn_pdrop`` is the float llm-foundry writes; transformers' strict
    MptAttentionConfig rejects it (as it rejects grouped-query ``attn_type``),
    so these folders load through kvflow's plain-config fallback, tokenizer included.
    """
    attn = {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0.0,
            "attn_type": "multihead_attention", "attn_uses_sequence_id": False,
            "clip_qkv": None, "prefix_lm": False, "qk_ln": False, "softmax_scale": None,
            **attn_config}
    return {
        "architectures": ["MPTForCausalLM"], "model_type": "mpt",
        "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig",
                     "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
        "d_model": d_model, "n_heads": n_heads, "n_layers": 2, "expansion_ratio": 4,
        "max_seq_len": MAX_LEN, "vocab_size": vocab, "attn_config": attn,
        "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in",
                        "init_nonlinearity": "relu", "init_div_is_residual": True},
        "no_bias": True, "norm_type": "low_precision_layernorm", "learned_pos_emb": True,
        "logit_scale": None, "emb_pdrop": 0, "resid_pdrop": 0, "embedding_fraction": 1.0,
        "use_cache": False, "verbose": 0, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, **overrides,
    }


def _write_mosaicml_folder(path: str, config: dict, weights: dict[str, torch.Tensor],
                           tokenizer_from: str) -> str:
    """A remote-code style folder: config.json, pytorch_model.bin (as mpt-7b ships), tokenizer."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save(weights, os.path.join(path, "pytorch_model.bin"))
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path


def _mosaicml_names(n_layers: int, *, has_bias: bool, has_qk_ln: bool) -> set[str]:
    names = {"transformer.wte.weight", "transformer.norm_f.weight"}
    for i in range(n_layers):
        p = f"transformer.blocks.{i}"
        names |= {f"{p}.norm_1.weight", f"{p}.norm_2.weight", f"{p}.attn.Wqkv.weight",
                  f"{p}.attn.out_proj.weight", f"{p}.ffn.up_proj.weight",
                  f"{p}.ffn.down_proj.weight"}
        if has_qk_ln:
            names |= {f"{p}.attn.q_ln.weight", f"{p}.attn.k_ln.weight"}
    if has_bias:
        names |= {n.replace(".weight", ".bias") for n in names if n != "transformer.wte.weight"}
    return names


def test_mosaicml_layout_matches_transformers(references, tmp_path, tokenizer_dir, vocab):
    """transformers' checkpoint rewritten as mosaicml's MPTForCausalLM gives the same tokens."""
    path, prompts, expected = references("heads6")
    weights = load_file(os.path.join(path, "model.safetensors"))
    # transformers kept mosaicml's tensor names: the rewrite is the config (and the file format).
    assert set(weights) == _mosaicml_names(2, has_bias=False, has_qk_ln=False)
    folder = _write_mosaicml_folder(str(tmp_path / "mosaicml"),
                                    _mosaicml_config(vocab, 96, 6, {}), weights, tokenizer_dir)
    llm = LLM(folder, max_model_len=MAX_LEN)
    assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected


# name -> (n_heads, attn_config overrides, top-level overrides)
MOSAICML_ONLY = {
    # grouped K/V heads (3 query heads each), LayerNorm on q and k, biases, a narrower MLP
    "gqa_qk_ln_bias": (6, {"attn_type": "grouped_query_attention", "kv_n_heads": 2,
                           "qk_ln": True, "clip_qkv": 0.6},
                       {"no_bias": False, "expansion_ratio": 3}),
    "multiquery": (6, {"attn_type": "multiquery_attention"}, {}),
}


def _random_mosaicml_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d, n_heads, attn = cfg["d_model"], cfg["n_heads"], cfg["attn_config"]
    head_dim = d // n_heads
    kv = _num_kv_heads(cfg)
    ffn = cfg["expansion_ratio"] * d
    shapes = {"transformer.wte.weight": (cfg["vocab_size"], d), "transformer.norm_f.weight": (d,)}
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}"
        shapes |= {f"{p}.norm_1.weight": (d,), f"{p}.norm_2.weight": (d,),
                   f"{p}.attn.Wqkv.weight": ((n_heads + 2 * kv) * head_dim, d),
                   f"{p}.attn.out_proj.weight": (d, d),
                   f"{p}.ffn.up_proj.weight": (ffn, d), f"{p}.ffn.down_proj.weight": (d, ffn)}
        if attn["qk_ln"]:
            shapes |= {f"{p}.attn.q_ln.weight": (d,), f"{p}.attn.k_ln.weight": (kv * head_dim,)}
    if not cfg["no_bias"]:
        shapes |= {n.replace(".weight", ".bias"): (s[0],) for n, s in shapes.items()
                   if n != "transformer.wte.weight"}
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith(".bias"):
            weights[name] = 0.05 * noise
        elif len(shape) == 1:  # norm scales around one
            weights[name] = 1.0 + 0.1 * noise
        else:
            weights[name] = 0.08 * noise
    return weights


def _num_kv_heads(cfg: dict) -> int:
    attn = cfg["attn_config"]
    return {"multihead_attention": cfg["n_heads"],
            "multiquery_attention": 1}.get(attn["attn_type"], attn.get("kv_n_heads"))


def _mosaicml_slopes(n_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """mosaicml's ALiBi slope schedule from its definition, in Python floats."""
    padded = 1 << (n_heads - 1).bit_length()
    slopes = [2.0 ** -((i + 1) * alibi_bias_max / padded) for i in range(padded)]
    if padded != n_heads:
        slopes = (slopes[1::2] + slopes[::2])[:n_heads]
    return torch.tensor(slopes)


def _mosaicml_last_logits(cfg: dict, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """mosaicml's MPT forward, no cache: logits [V] of the last of ``ids``."""
    d, n_heads, attn = cfg["d_model"], cfg["n_heads"], cfg["attn_config"]
    head_dim, kv, seq = d // n_heads, _num_kv_heads(cfg), len(ids)

    def norm(x, name):
        return F.layer_norm(x, (x.shape[-1],), w[f"{name}.weight"], w.get(f"{name}.bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    # mosaicml's bias: slope * (k - last key), the same for every query row; causal mask after.
    keys = torch.arange(1 - seq, 1, dtype=torch.float32)
    bias = _mosaicml_slopes(n_heads, attn["alibi_bias_max"])[:, None, None] * keys  # [H, 1, S]
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    x = w["transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}"
        qkv = linear(norm(x, f"{p}.norm_1"), f"{p}.attn.Wqkv")
        if attn["clip_qkv"]:
            qkv = qkv.clamp(-attn["clip_qkv"], attn["clip_qkv"])
        q, k, v = qkv.split([d, kv * head_dim, kv * head_dim], dim=-1)
        if attn["qk_ln"]:
            q, k = norm(q, f"{p}.attn.q_ln"), norm(k, f"{p}.attn.k_ln")
        q = q.view(seq, n_heads, head_dim).transpose(0, 1)  # [H, S, D]
        # Each K/V head serves n_heads // kv consecutive query heads.
        k = k.view(seq, kv, head_dim).transpose(0, 1).repeat_interleave(n_heads // kv, dim=0)
        v = v.view(seq, kv, head_dim).transpose(0, 1).repeat_interleave(n_heads // kv, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(head_dim) + bias
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = (probs @ v).transpose(0, 1).reshape(seq, d)
        x = x + linear(out, f"{p}.attn.out_proj")
        x = x + linear(F.gelu(linear(norm(x, f"{p}.norm_2"), f"{p}.ffn.up_proj")),
                       f"{p}.ffn.down_proj")
    return norm(x, "transformer.norm_f")[-1] @ w["transformer.wte.weight"].T


def _mosaicml_greedy(cfg: dict, w: dict[str, torch.Tensor],
                     prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    for ids in prompts:
        ids = list(ids)
        for _ in range(NEW_TOKENS):
            ids.append(int(_mosaicml_last_logits(cfg, w, ids).argmax()))
        outs.append(ids[-NEW_TOKENS:])
    return outs


@pytest.mark.parametrize("variant", list(MOSAICML_ONLY))
def test_mosaicml_only_features(variant, tmp_path, tokenizer_dir, vocab):
    n_heads, attn, top = MOSAICML_ONLY[variant]
    cfg = _mosaicml_config(vocab, 16 * n_heads, n_heads, attn, **top)
    weights = _random_mosaicml_weights(cfg)
    assert set(weights) == _mosaicml_names(2, has_bias=not cfg["no_bias"],
                                           has_qk_ln=cfg["attn_config"]["qk_ln"])
    folder = _write_mosaicml_folder(str(tmp_path / variant), cfg, weights, tokenizer_dir)
    prompts = tiny_models.random_prompts(vocab, PROMPT_LENS, seed=1)
    expected = _mosaicml_greedy(cfg, weights, prompts)
    llm = LLM(folder, max_model_len=MAX_LEN, max_num_batched_tokens=16)
    assert llm.llm_engine.config.model_config.num_kv_heads == _num_kv_heads(cfg)
    assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected


def test_tensor_parallel_shards_of_fused_wqkv(monkeypatch, tmp_path, tokenizer_dir, vocab):
    """Each rank's Wqkv holds its query heads and its (replicated) K/V head, in order."""
    from kvflow.attention.backends.torch_ref import TorchAttentionBackend
    from kvflow.distributed import parallel_state
    from kvflow.models.base import ModelContext
    from kvflow.models.loader import iterate_checkpoint
    from kvflow.models.mpt import MptForCausalLM
    from kvflow.models.source import load_hf_config

    cfg = _mosaicml_config(vocab, 96, 6, {"attn_type": "multiquery_attention"})
    weights = _random_mosaicml_weights(cfg)
    folder = _write_mosaicml_folder(str(tmp_path / "mqa"), cfg, weights, tokenizer_dir)
    hf_config = load_hf_config(folder)
    full = weights["transformer.blocks.1.attn.Wqkv.weight"]
    q, k, v = full.split([96, 16, 16])
    all_slopes = _mosaicml_slopes(6, 8)
    for rank in range(2):
        monkeypatch.setattr(parallel_state, "_TP", parallel_state.TPGroup(rank, 2, None))
        model = MptForCausalLM(hf_config, ModelContext(torch.float32, TorchAttentionBackend()))
        model.load_weights(iterate_checkpoint(folder))
        attn = model.transformer.blocks[1].attn
        heads = slice(rank * 48, (rank + 1) * 48)  # 3 query heads of 16 per rank
        assert torch.equal(attn.Wqkv.weight, torch.cat([q[heads], k, v]))
        assert torch.allclose(attn.attn.alibi_slopes, all_slopes[rank * 3:(rank + 1) * 3])
