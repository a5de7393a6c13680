"""Falcon: greedy equality with transformers for each generation, and the RW remote-code configs.

Float32 on CPU, several prompt lengths in one batch. The fused
``query_key_value`` split is also checked per tensor-parallel rank against
transformers' own split of the same weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import tiny_models
from kvflow import LLM

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, FalconConfig  # noqa: E402

NEW_TOKENS = 12
PROMPT_LENS = [1, 3, 17, 40, 60]
MAX_LEN = 128

# name -> FalconConfig overrides (hidden_size 64)
VARIANTS = {
    # falcon-7b: one K/V head, attention and MLP in parallel on one LayerNorm, rotary
    "7b": dict(num_attention_heads=4, multi_query=True, parallel_attn=True),
    # falcon-40b/180b: 8 query heads in 2 K/V groups, ln_attn and ln_mlp
    "40b": dict(num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True),
    # falcon-rw-1b: ALiBi, multi-head, attention then MLP, biases
    "rw_alibi": dict(num_attention_heads=4, alibi=True, multi_query=False, parallel_attn=False,
                     bias=True),
}

# variant -> the model_type of the remote code that ran such checkpoints
REMOTE_MODEL_TYPES = {"7b": "RefinedWebModel", "40b": "RefinedWeb", "rw_alibi": "RefinedWebModel"}


@pytest.fixture(scope="module")
def vocab(tokenizer_dir: str) -> int:
    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def _falcon_config(vocab: int, **overrides) -> FalconConfig:
    return FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                        max_position_embeddings=MAX_LEN, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, **overrides)


@pytest.fixture(scope="module")
def references(tmp_path_factory, tokenizer_dir, vocab):
    """variant -> (checkpoint folder, prompts, transformers' greedy tokens), made once."""
    return tiny_models.greedy_references(
        lambda v: tmp_path_factory.mktemp(f"falcon-{v}"), tokenizer_dir,
        lambda v: _falcon_config(vocab, **VARIANTS[v]),
        tiny_models.random_prompts(vocab, PROMPT_LENS), NEW_TOKENS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(variant, references):
    path, prompts, expected = references(variant)
    llm = LLM(path, max_model_len=MAX_LEN)
    # Then again from the prefix cache (60-token prompt: 3 full blocks cached).
    tiny_models.check_greedy_twice(llm, prompts, expected, NEW_TOKENS, min_cached=48)


@pytest.mark.parametrize("variant", ["40b", "rw_alibi"])
def test_greedy_under_preemption_and_chunking(variant, references):
    path, prompts, expected = references(variant)
    # 8 blocks x 16 = one max_model_len for five requests that need ~180 tokens: preemption;
    # a 16-token budget splits every long prompt into chunks.
    llm = LLM(path, max_model_len=MAX_LEN, num_gpu_blocks_override=8,
              max_num_batched_tokens=16, block_size=16)
    assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected
    sched = llm.llm_engine.scheduler
    assert sched.num_preemptions > 0
    assert sched.kv_cache_manager.num_free_blocks == 8
    sched.check_integrity()


@pytest.mark.parametrize("variant", ["40b", "rw_alibi"])
def test_tensor_parallel_greedy_matches_transformers(variant, references):
    """tp=2 over CPU processes: the 40B style sums attention and MLP before one all-reduce;
    the RW style (biases, sequential) reduces each, and splits its ALiBi slopes by rank."""
    path, prompts, expected = references(variant)
    llm = LLM(path, max_model_len=MAX_LEN, tensor_parallel_size=2, device="cpu")
    try:
        assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected
    finally:
        llm.llm_engine.shutdown()


def _rw_config(hf: dict, model_type: str) -> dict:
    """transformers' Falcon config.json rewritten as the original RWConfig wrote it."""
    cfg = {
        "architectures": ["RWForCausalLM"], "model_type": model_type,
        "auto_map": {"AutoConfig": "configuration_RW.RWConfig",
                     "AutoModelForCausalLM": "modelling_RW.RWForCausalLM"},
        "hidden_size": hf["hidden_size"], "n_head": hf["num_attention_heads"],
        "n_layer": hf["num_hidden_layers"], "vocab_size": hf["vocab_size"],
        "layer_norm_epsilon": hf["layer_norm_epsilon"], "initializer_range": 0.02,
        "bias": hf["bias"], "alibi": hf["alibi"], "parallel_attn": hf["parallel_attn"],
        "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "bos_token_id": hf["bos_token_id"],
        "eos_token_id": hf["eos_token_id"], "use_cache": True, "torch_dtype": "float32",
    }
    if model_type == "RefinedWeb":  # the 40B code: always the new decoder, no flag for it
        cfg["n_head_kv"] = hf["num_kv_heads"]
    else:
        cfg["multi_query"] = hf["multi_query"]
    return cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_remote_code_layout_matches_transformers(variant, references, tmp_path, tokenizer_dir):
    """transformers' checkpoint rewritten as an RWForCausalLM folder gives the same tokens."""
    path, prompts, expected = references(variant)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    folder = tmp_path / "rw"
    folder.mkdir()
    with open(folder / "config.json", "w") as f:
        json.dump(_rw_config(hf, REMOTE_MODEL_TYPES[variant]), f)
    # The remote code used transformers' tensor names; its repos ship .bin files.
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert all(n.startswith("transformer.") for n in weights)
    torch.save(weights, folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(folder))
    llm = LLM(str(folder), max_model_len=MAX_LEN)
    assert llm.llm_engine.config.model_config.architecture == "RWForCausalLM"
    assert tiny_models.kvflow_greedy(llm, prompts, NEW_TOKENS) == expected


def _transformers_split_heads(hf_attn, x, monkeypatch):
    """q, k, v [1, T, H or Hkv, D] as transformers' FalconAttention splits its fused
    projection of x. Older versions expose the split as ``_split_heads``; newer ones do it
    inside ``forward``, so there it is read off what forward hands its attention function,
    with rotary made the identity (it is applied after the split)."""
    with torch.no_grad():
        if hasattr(hf_attn, "_split_heads"):
            return hf_attn._split_heads(hf_attn.query_key_value(x))
        from transformers.models.falcon import modeling_falcon

        seen = {}

        def capture(module, query, key, value, *args, **kwargs):  # [1, H or Hkv, T, D]
            seen.update(q=query.transpose(1, 2), k=key.transpose(1, 2), v=value.transpose(1, 2))
            return torch.zeros_like(query).transpose(1, 2), None

        monkeypatch.setattr(modeling_falcon, "apply_rotary_pos_emb", lambda q, k, *_: (q, k))
        monkeypatch.setattr(modeling_falcon, "eager_attention_forward", capture)
        monkeypatch.setattr(hf_attn.config, "_attn_implementation", "eager")
        ones = torch.ones(1, x.shape[1], hf_attn.head_dim)
        hf_attn(x, attention_mask=None, position_embeddings=(ones, ones))
        return seen["q"], seen["k"], seen["v"]


@pytest.mark.parametrize("variant,tp", [("40b", 2), ("40b", 4), ("7b", 2), ("rw_alibi", 2)])
def test_tensor_parallel_shards_follow_transformers_split(variant, tp, references, monkeypatch):
    """Rank r's q/k/v of the fused projection are the heads transformers' split gives it.

    Query heads are split in order over ranks; K/V heads too when there are at
    least as many as ranks, else each is replicated on consecutive ranks.
    """
    from transformers import AutoModelForCausalLM

    from kvflow.attention.backends.torch_ref import TorchAttentionBackend
    from kvflow.distributed import parallel_state
    from kvflow.models.base import ModelContext
    from kvflow.models.falcon import FalconForCausalLM, falcon_alibi_slopes
    from kvflow.models.loader import iterate_checkpoint
    from kvflow.models.source import load_hf_config

    path, _, _ = references(variant)
    hf_attn = AutoModelForCausalLM.from_pretrained(path).transformer.h[1].self_attention
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    q, k, v = _transformers_split_heads(hf_attn, x, monkeypatch)  # [1, T, H or Hkv, D] each
    num_heads = hf_attn.num_heads
    num_kv_heads = 1 if k.shape[2] == 1 else hf_attn.num_kv_heads
    # The new decoder broadcasts each K/V head over its group: keep one per group.
    k, v = k[0, :, ::k.shape[2] // num_kv_heads], v[0, :, ::v.shape[2] // num_kv_heads]
    q = q[0]
    heads_per_rank, kv_per_rank = num_heads // tp, max(1, num_kv_heads // tp)
    hf_config = load_hf_config(path)
    for rank in range(tp):
        monkeypatch.setattr(parallel_state, "_TP", parallel_state.TPGroup(rank, tp, None))
        model = FalconForCausalLM(hf_config, ModelContext(torch.float32, TorchAttentionBackend()))
        model.load_weights(iterate_checkpoint(path))
        attn = model.transformer.h[1].self_attention
        with torch.no_grad():
            out = attn.query_key_value(x[0])
        mine_q, mine_k, mine_v = out.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        kv_rank = rank // max(1, tp // num_kv_heads)
        heads = slice(rank * heads_per_rank, (rank + 1) * heads_per_rank)
        kv_heads = slice(kv_rank * kv_per_rank, (kv_rank + 1) * kv_per_rank)
        assert torch.allclose(mine_q, q[:, heads].flatten(1), atol=1e-6)
        assert torch.allclose(mine_k, k[:, kv_heads].flatten(1), atol=1e-6)
        assert torch.allclose(mine_v, v[:, kv_heads].flatten(1), atol=1e-6)
        if VARIANTS[variant].get("alibi"):
            slopes = falcon_alibi_slopes(num_heads, 64 // num_heads)
            assert torch.equal(attn.attn.alibi_slopes, slopes[heads])
