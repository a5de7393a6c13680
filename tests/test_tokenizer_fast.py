"""load_tokenizer's direct path (the generic fast class, without AutoTokenizer's imports)
against AutoTokenizer itself: same class, ids, text, special tokens and chat template; and
the folders it must leave to AutoTokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny_models
from kvflow.entrypoints.llm import apply_chat_template
from kvflow.tokenizer import eos_token_ids, is_plain_fast_tokenizer, load_tokenizer

TEXTS = [
    "Hello world! How are you today?",
    "法国的首都是哪里？ Emoji 😀 and café.",
    "<s>special <|im_start|> tokens</s> inline<unk>",
    "  leading and trailing spaces  ",
    "",
]
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}]


def _folder(tmp_path, tokenizer_dir: str, *, model_type: str | None = "llama",
            tokenizer_class: str | None = None, **config_extra) -> str:
    """The tiny tokenizer, optionally renamed, beside a config.json of ``model_type``."""
    path = str(tmp_path / f"tok-{model_type}-{tokenizer_class}")
    shutil.copytree(tokenizer_dir, path)
    if tokenizer_class is not None:
        config_file = os.path.join(path, "tokenizer_config.json")
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
        data["tokenizer_class"] = tokenizer_class
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(data, f)
    if model_type is not None:
        if model_type in tiny_models.FAMILIES:
            config = tiny_models.FAMILIES[model_type](420).to_dict()
        else:  # transformers' defaults for the rest
            config = {"model_type": model_type, "vocab_size": 420}
        config.update(config_extra)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    return path


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _auto(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _assert_same_tokenizer(fast, auto) -> None:
    assert type(fast) is type(auto)
    assert len(fast) == len(auto) and fast.vocab_size == auto.vocab_size
    assert fast.get_vocab() == auto.get_vocab()
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id",
                 "eos_token_id", "unk_token_id", "pad_token_id", "all_special_tokens",
                 "all_special_ids", "model_max_length", "padding_side", "chat_template"):
        assert getattr(fast, name) == getattr(auto, name), name
    assert ({i: str(t) for i, t in fast.added_tokens_decoder.items()}
            == {i: str(t) for i, t in auto.added_tokens_decoder.items()})
    for text in TEXTS:
        for special in (True, False):
            ids = fast.encode(text, add_special_tokens=special)
            assert ids == auto.encode(text, add_special_tokens=special), (text, special)
            assert fast.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
            for skip in (True, False):
                assert (fast.decode(ids, skip_special_tokens=skip)
                        == auto.decode(ids, skip_special_tokens=skip))
    every_id = list(range(len(auto)))
    assert fast.decode(every_id) == auto.decode(every_id)
    assert [fast.decode([i]) for i in every_id] == [auto.decode([i]) for i in every_id]
    for generation_prompt in (True, False):
        rendered = fast.apply_chat_template(CONVERSATION, tokenize=False,
                                            add_generation_prompt=generation_prompt)
        assert rendered == auto.apply_chat_template(CONVERSATION, tokenize=False,
                                                    add_generation_prompt=generation_prompt)
        assert (apply_chat_template(fast, CONVERSATION, add_generation_prompt=generation_prompt)
                == apply_chat_template(auto, CONVERSATION,
                                       add_generation_prompt=generation_prompt))


@pytest.mark.parametrize("tokenizer_class", [None, "PreTrainedTokenizerFast",
                                             "TokenizersBackend"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "mpt", "falcon", None])
def test_direct_path_matches_auto_tokenizer(tmp_path, tokenizer_dir, model_type,
                                            tokenizer_class):
    """tokenizer_class None keeps what this transformers writes (its generic class's name);
    model_type None is a tokenizer-only folder (no config.json)."""
    if tokenizer_class == "TokenizersBackend" and int(_transformers_version().split(".")[0]) < 5:
        pytest.skip("transformers 4 has no TokenizersBackend for AutoTokenizer to compare with")
    path = _folder(tmp_path, tokenizer_dir, model_type=model_type,
                   tokenizer_class=tokenizer_class)
    assert is_plain_fast_tokenizer(path)
    fast, auto = load_tokenizer(path), _auto(path)
    _assert_same_tokenizer(fast, auto)
    assert eos_token_ids(fast, path, None) == eos_token_ids(auto, path, None) == {2}


def test_direct_path_imports_no_auto_classes(tmp_path, tokenizer_dir):
    """The point of the direct path: transformers' config and auto machinery (torch
    distributed tensors, sympy, accelerate) stays unimported. A fresh interpreter, since
    this one has imported AutoTokenizer already."""
    path = _folder(tmp_path, tokenizer_dir)
    code = ("import sys; from kvflow.tokenizer import load_tokenizer; "
            f"tok = load_tokenizer({path!r}); assert tok.encode('Hello') ; "
            "heavy = [m for m in ('transformers.configuration_utils', "
            "'transformers.models.auto.tokenization_auto', 'accelerate', 'sympy') "
            "if m in sys.modules]; assert not heavy, heavy")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("case", ["qwen2", "named-class", "auto-map-tokenizer",
                                  "auto-map-config", "no-tokenizer-json", "tekken",
                                  "unknown-type"])
def test_other_folders_go_through_auto_tokenizer(tmp_path, tokenizer_dir, case):
    """Folders whose class AutoTokenizer picks by rules of its own: left to it, same result."""
    model_type = {"qwen2": "qwen2"}.get(case, "llama")
    tokenizer_class = {"named-class": "LlamaTokenizerFast"}.get(case)
    extra = {"auto_map": {"AutoConfig": "x.Config"}} if case == "auto-map-config" else {}
    path = _folder(tmp_path, tokenizer_dir, model_type=model_type,
                   tokenizer_class=tokenizer_class, **extra)
    if case == "auto-map-tokenizer":
        config_file = os.path.join(path, "tokenizer_config.json")
        data = json.load(open(config_file, encoding="utf-8"))
        data["auto_map"] = {"AutoTokenizer": [None, "x.Tokenizer"]}
        json.dump(data, open(config_file, "w", encoding="utf-8"))
    elif case == "no-tokenizer-json":
        os.remove(os.path.join(path, "tokenizer.json"))
    elif case == "tekken":
        open(os.path.join(path, "tekken.json"), "w").close()
    elif case == "unknown-type":
        config_file = os.path.join(path, "config.json")
        data = json.load(open(config_file, encoding="utf-8"))
        data["model_type"] = "gpt2"
        json.dump(data, open(config_file, "w", encoding="utf-8"))
    assert not is_plain_fast_tokenizer(path)
    if case in ("auto-map-tokenizer", "no-tokenizer-json", "tekken", "auto-map-config"):
        return  # decided without loading: these folders are not loadable as they stand
    tokenizer = load_tokenizer(path)
    _assert_same_tokenizer(tokenizer, _auto(path))


def test_broken_tokenizer_json_fails_as_before(tmp_path, tokenizer_dir):
    """A folder that looks plain but does not load falls back to AutoTokenizer's error."""
    path = _folder(tmp_path, tokenizer_dir)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write("{not json")
    assert is_plain_fast_tokenizer(path)
    with pytest.raises(ValueError, match="Could not load a tokenizer"):
        load_tokenizer(path)


def test_none_path():
    assert load_tokenizer(None) is None
