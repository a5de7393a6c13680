"""Tiny random checkpoints and a small trained tokenizer, written offline by the tests."""

from __future__ import annotations

import os
import random
from typing import Any, Callable

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "What is the capital of France? Paris is the capital of France.",
    "Hello world! How are you today? I am fine, thank you.",
    "法国的首都是哪里？巴黎是法国的首都。第一个宝可梦游戏发布的那一年是哪位美国总统？",
    "问题: 回答: 让我们逐步思考。",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Emoji 😀 🚀 and accents: café naïve résumé.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(path: str) -> Any:
    """Trains a byte-level BPE of ~400 tokens and saves it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def llama_config(vocab: int, **kw: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**{**_common(vocab), **kw})


def llama3_config(vocab: int, **kw: Any):
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            "rope_theta": 500000.0}
    return LlamaConfig(**{**_common(vocab), "tie_word_embeddings": True,
                          "rope_parameters": rope, **kw})


def mistral_config(vocab: int, **kw: Any):
    from transformers import MistralConfig

    return MistralConfig(**{**_common(vocab), "sliding_window": 8, **kw})


def qwen2_config(vocab: int, **kw: Any):
    from transformers import Qwen2Config

    return Qwen2Config(**{**_common(vocab), "tie_word_embeddings": True, **kw})


def qwen3_config(vocab: int, **kw: Any):
    from transformers import Qwen3Config

    return Qwen3Config(**{**_common(vocab), "head_dim": 32, **kw})


FAMILIES: dict[str, Callable[..., Any]] = {
    "llama": llama_config,
    "llama3": llama3_config,
    "mistral": mistral_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
}


def write_checkpoint(path: str, config: Any, *, seed: int = 0, tokenizer_from: str | None = None,
                     safe_serialization: bool = True, max_shard_size: str | None = None) -> str:
    """Saves a randomly initialised transformers model (float32) and a tokenizer into ``path``."""
    from transformers import AutoModelForCausalLM

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default weights make logits spread out, so greedy choices are robust.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() > 1:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    kwargs: dict[str, Any] = {"safe_serialization": safe_serialization}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    else:
        write_tokenizer(path)
    return path


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (one at a time: no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
            outs.append(y[0, len(ids):].tolist())
    return outs


def hf_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ``ids`` ([L, V])."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def random_prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths: BOS (1), then random ids above the special tokens."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(5, vocab) for _ in range(n - 1)] for n in lens]


def kvflow_greedy(llm: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """kvflow's greedy continuation of every prompt, in one batch."""
    from kvflow import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def check_greedy_twice(llm: Any, prompts: list[list[int]], expected: list[list[int]],
                       new_tokens: int, min_cached: int) -> None:
    """Greedy tokens equal ``expected`` on a fresh engine, then again when the prompts hit
    the prefix cache (the last one with at least ``min_cached`` cached tokens); no block
    is leaked."""
    from kvflow import SamplingParams

    assert kvflow_greedy(llm, prompts, new_tokens) == expected
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[-1].num_cached_tokens >= min_cached
    llm.llm_engine.scheduler.check_integrity()


def greedy_references(root: Callable[[str], Any], tokenizer_dir: str,
                      make_config: Callable[[str], Any], prompts: list[list[int]],
                      new_tokens: int) -> Callable[[str], tuple[str, list, list]]:
    """variant -> (checkpoint folder, prompts, transformers' greedy tokens), each made once.

    ``root(name)`` gives a fresh folder (pytest's ``tmp_path_factory.mktemp``);
    ``make_config(variant)`` the transformers config of that variant.
    """
    cache: dict[str, tuple[str, list, list]] = {}

    def get(variant: str) -> tuple[str, list, list]:
        if variant not in cache:
            path = str(root(variant))
            write_checkpoint(path, make_config(variant), tokenizer_from=tokenizer_dir)
            cache[variant] = (path, prompts, hf_greedy(path, prompts, new_tokens))
        return cache[variant]

    return get


def LLM32(*args: Any, **kwargs: Any):
    """``kvflow.LLM`` in float32 on any device: the precision the equality tests compare in
    (on a GPU, ``dtype="auto"`` would pick float16 for these float32 checkpoints)."""
    from kvflow import LLM

    kwargs.setdefault("dtype", "float32")
    return LLM(*args, **kwargs)
