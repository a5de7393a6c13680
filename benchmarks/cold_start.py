"""C1 (BENCHMARKS.md): a new process to its first token, from a safetensors checkpoint on disk.

    python benchmarks/cold_start.py [--shape llama3-8b] [--dir /tmp/kvflow-c1] [--runs 2]
                                    [--profile] [--dummy] [--no-tokenizer] [--compare DIR]
                                    [--skip-hf] [--no-compile]
    python benchmarks/cold_start.py --shape tiny --device cpu --profile   # CPU dry run

Writes the checkpoint once (random bf16 weights of the shape, 5 GB shards) and a
tokenizer beside it, then starts kvflow ``--runs`` times in fresh Python
processes (the first start of a fresh machine also pays for Triton's JIT and for
paging the packages in; the later ones show what a restart costs) and
transformers' ``AutoTokenizer`` + ``from_pretrained`` + one-token ``generate``
once.

The tokenizer is a synthetic one of Llama-3's size, so that loading it costs what
loading Llama-3's does: a byte-level BPE ``tokenizer.json`` (the 256 byte
tokens, then tokens that each join two earlier ones up to ``vocab_size - 256``
(128000 for llama3-8b), with every split of a token into two earlier ones as a
merge, as in Llama-3's file: ~274k merges, 8.7 MB against Llama-3's 9.1 MB),
Llama-3's pre-tokenizer regex, byte-level decoder and BOS post-processor, and
its 256 specials (``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|eot_id|>``,
header ids, reserved ones) in the top ids; ``tokenizer_config.json`` (generic
fast class, Llama-3-Instruct's chat template, BOS, EOS ``<|eot_id|>``) and
``special_tokens_map.json``. The merges are drawn at random (seeded, about 2 s)
rather than trained: load cost depends on the number and length of the entries,
not on whether they suit English. A tokenizer already in the folder is kept.
``--no-tokenizer`` writes none and starts with ``skip_tokenizer_init=True``
(the figure before the tokenizer was counted).

Every kvflow start is broken down end to end, so the phases add up to the
new-process-to-first-token time: interpreter start, ``import kvflow``, each
piece of ``EngineArgs.create_engine_config`` (HF config, device resolution =
the first CUDA call, Triton check, quantization check, model description),
tokenizer + EOS ids (``load_tokenizer`` includes importing transformers'
tokenizer classes), then the engine's own timers (load, memory profile, KV
cache + CUDA graphs) and the first token (returned as text when there is a
tokenizer). The pieces are timed by wrapping those functions in the child, so
the engine carries no benchmark code.

``--profile`` adds two more starts: one under ``-X importtime`` (import seconds
summed per top-level package, and the slowest modules) and one under cProfile
(top cumulative entries). ``--dummy`` skips the checkpoint (config.json and the
tokenizer only, ``load_format="dummy"``): enough to see everything before the
weights. ``--compare DIR`` also starts the kvflow package found in DIR (e.g. an
export of an older commit), so before/after come from one machine.
Before the starts, kvflow and the PYTHONPATH packages are byte-compiled (as ``pip
install`` leaves them; ``--no-compile`` skips it): see ``compile_sources``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pstats
import random
import re
import string
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: model dir, parent's spawn instant (time.time()), device, dtype, load format,
# "1" to load the folder's tokenizer ("0": skip_tokenizer_init), cProfile output path ("" for none).
KVFLOW_CHILD = r"""
import time
spawn_wall = time.time()
import json, sys
model_dir, spawn, device, dtype, load_format, with_tokenizer, prof_path = sys.argv[1:8]
with_tokenizer = with_tokenizer == "1"
prof = None
if prof_path:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
t0 = time.perf_counter()
from kvflow import LLM, SamplingParams
t_import = time.perf_counter() - t0

timers = {}

def timed(owner, name, key):
    fn = getattr(owner, name, None)
    if fn is None:  # renamed or gone: that piece simply is not reported
        return
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[key] = timers.get(key, 0.0) + time.perf_counter() - start
    setattr(owner, name, wrapper)

th = time.perf_counter()
import kvflow.config as config_mod
import kvflow.engine.llm_engine as engine_mod
import kvflow.models.registry as registry_mod
import kvflow.models.source as source_mod
timed(config_mod.EngineArgs, "create_engine_config", "config")
timed(source_mod, "load_hf_config", "config.hf_config")
timed(source_mod, "_download", "config.hub_download")
timed(config_mod.EngineArgs, "_resolve_device", "config.device (first CUDA call)")
timed(config_mod, "_triton_available", "config.triton check")
timed(config_mod, "_resolve_quantization", "config.quantization")
timed(registry_mod, "describe_model", "config.describe model")
timed(engine_mod, "load_tokenizer", "tokenizer")
timed(engine_mod, "eos_token_ids", "eos ids")
t_harness = time.perf_counter() - th

t1 = time.perf_counter()
llm = LLM(model_dir, skip_tokenizer_init=not with_tokenizer, dtype=dtype, device=device,
          max_model_len=4096, load_format=load_format)
t2 = time.perf_counter()
# Token ids keep the prompt at exactly 512 tokens; the first token comes back as text when
# there is a tokenizer, as a server would return it.
llm.generate({"prompt_token_ids": [1000 + i for i in range(512)]},
             SamplingParams(max_tokens=1, ignore_eos=True, detokenize=with_tokenizer),
             use_tqdm=False)
if device != "cpu":
    import torch
    torch.cuda.synchronize()
t3 = time.perf_counter()
to_first = time.time() - float(spawn)
if prof is not None:
    prof.disable()
    prof.dump_stats(prof_path)
print(json.dumps({"interpreter": spawn_wall - float(spawn), "import": t_import,
                  "harness": t_harness, "engine": t2 - t1, "startup": llm.llm_engine.startup_seconds,
                  "timers": timers, "first_token": t3 - t2, "to_first_token": to_first,
                  "transformers_imported": "transformers" in sys.modules,
                  "tokenizer_loaded": getattr(llm, "get_tokenizer", lambda: None)() is not None}))
"""

HF_CHILD = r"""
import time
spawn_wall = time.time()
import json, sys
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
device = sys.argv[3]
t_tok = None
if sys.argv[5] == "1":
    AutoTokenizer.from_pretrained(sys.argv[1])
    t_tok = time.perf_counter() - t1
t_model = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[4]),
                                             device_map=device)
t2 = time.perf_counter()
x = torch.tensor([[1000 + i for i in range(512)]], device=device)
model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False)
if device != "cpu":
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"interpreter": spawn_wall - float(sys.argv[2]), "import torch": t_torch - t0,
                  "import transformers": t1 - t_torch, "tokenizer": t_tok, "load": t2 - t_model,
                  "first_token": t3 - t2,
                  "to_first_token": time.time() - float(sys.argv[2])}))
"""


def llama_layout(cfg: dict) -> Optional[dict[str, tuple[int, ...]]]:
    """Checkpoint names and shapes of a Llama-layout config (None for other layouts).

    Spares the parent importing transformers (about 10 s on a fresh GPU machine) just to
    list the tensors of the shapes C1 uses.
    """
    if cfg.get("model_type") != "llama":
        return None
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, h),
            p + "self_attn.k_proj.weight": (kv * head_dim, h),
            p + "self_attn.v_proj.weight": (kv * head_dim, h),
            p + "self_attn.o_proj.weight": (h, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def write_checkpoint(shape: str, path: str, device: str) -> None:
    """Random bf16 weights of the shape as safetensors shards (once; reused when present)."""
    import torch
    from safetensors.torch import save_file

    from gpu_suite import SHAPES

    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return
    os.makedirs(path, exist_ok=True)
    cfg = SHAPES[shape]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    shapes = llama_layout(cfg)
    if shapes is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        shapes = {name: tuple(p.shape) for name, p in meta.state_dict().items()}
    shard, size, index, n = {}, 0, {}, 0
    gen = torch.Generator(device=device).manual_seed(0)

    def flush() -> None:
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, shape_ in shapes.items():
        t = torch.empty(shape_, dtype=torch.bfloat16, device=device).uniform_(-0.02, 0.02,
                                                                             generator=gen)
        shard[name] = t.cpu()
        size += t.numel() * 2
        if size >= 5 << 30:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)


def write_config_only(shape: str, path: str) -> None:
    from gpu_suite import SHAPES

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f)


# A synthetic tokenizer of Llama-3's size. Building one by training BPE on a corpus would
# take minutes for 128k merges, so the merges are drawn at random (seeded) instead: what a
# load costs depends on how many entries tokenizer.json holds and how long they are, not
# on whether the merges suit English.

LLAMA3_NUM_SPECIAL = 256
"""Llama-3 keeps its special tokens in the top 256 ids (128000-128255 of 128256)."""

LLAMA3_NAMED_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                         7: "<|end_header_id|>", 9: "<|eot_id|>"}
"""Offsets in the special block of Llama-3's named specials; the others are reserved ones."""

LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama-3's pre-tokenizer regex (tiktoken's cl100k pattern)."""

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
"""Llama-3-8B-Instruct's chat template."""

_TOKEN_LENGTHS = list(range(2, 17))
_TOKEN_LENGTH_WEIGHTS = [4, 8, 11, 13, 13, 12, 10, 8, 6, 5, 3, 3, 2, 1, 1]
"""Lengths (in byte-level characters, "Ġ" included) drawn for word tokens: mean about 8."""

_WORD_KINDS = {"": 0.33, "Ġ": 0.47, "Cap": 0.07, "ĠCap": 0.13}
"""Word-token kinds (bare or after a space, lower case or capitalised) and their shares."""

_REUSE_EXPONENT = 4.0
"""Parts are drawn with a bias to earlier tokens (index ~ u**4), so tokens share pieces and
every token splits into earlier ones about 2.1 ways, as in Llama-3's converted merges
(280k merges for 128k tokens)."""


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in its order: Llama-3's ids 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def synthetic_vocab(num_tokens: int, seed: int = 0) -> dict[str, int]:
    """Byte tokens, then tokens that each concatenate two earlier ones, up to ``num_tokens``.

    Like Llama-3's: whitespace runs, all numbers of 1-3 digits, punctuation runs and, for
    the bulk, word pieces (bare or after the byte-level space "Ġ", lower case or
    capitalised) of realistic lengths. Deterministic for a seed.
    """
    rng = random.Random(seed)
    vocab = {t: i for i, t in enumerate(byte_alphabet())}

    def add(left: str, right: str) -> str | None:
        token = left + right
        if token in vocab or len(vocab) >= num_tokens:
            return None
        vocab[token] = len(vocab)
        return token

    for char, longest in (("Ġ", 16), ("Ċ", 8), ("ĉ", 8)):  # space, newline, tab runs
        for n in range(2, longest + 1):
            add(char * (n - 1), char)
    digits = "0123456789"
    for a in digits:
        for b in digits:
            add(a, b)
    for a in digits:
        for b in digits:
            for c in digits:
                add(a + b, c)
    letters = string.ascii_lowercase
    by_length: dict[str, dict[int, list[str]]] = {kind: defaultdict(list) for kind in _WORD_KINDS}
    by_length[""][1] += letters
    by_length["Cap"][1] += letters.upper()
    for c in letters:
        by_length["Ġ"][2].append(add("Ġ", c))
        by_length["ĠCap"][2].append(add("Ġ", c.upper()))
    punctuation = list(string.punctuation)
    kinds, shares = list(_WORD_KINDS), list(_WORD_KINDS.values())
    while len(vocab) < num_tokens:
        if rng.random() < 0.03:
            token = add(rng.choice(punctuation) if rng.random() < 0.7 else "Ġ",
                        rng.choice(string.punctuation))
            if token is not None:
                punctuation.append(token)
            continue
        kind = rng.choices(kinds, shares)[0]
        length = rng.choices(_TOKEN_LENGTHS, _TOKEN_LENGTH_WEIGHTS)[0]
        cut = rng.randint(1, length - 1)
        heads, tails = by_length[kind].get(cut), by_length[""].get(length - cut)
        if heads and tails:
            token = add(heads[int(len(heads) * rng.random() ** _REUSE_EXPONENT)],
                        tails[int(len(tails) * rng.random() ** _REUSE_EXPONENT)])
            if token is not None:
                by_length[kind][length].append(token)
    return vocab


def all_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of each token into two earlier tokens, ordered by the token's id.

    The merge list Llama-3's tokenizer.json carries (converted from tiktoken ranks) is of
    this form, so its size and parse cost are matched too; each merge's parts are in the
    vocabulary and concatenate to a token of a later id.
    """
    merges: list[tuple[str, str]] = []
    for token, token_id in vocab.items():
        splits = []
        for i in range(1, len(token)):
            left, right = vocab.get(token[:i]), vocab.get(token[i:])
            if left is not None and right is not None and left < token_id and right < token_id:
                splits.append((left, right, token[:i], token[i:]))
        merges += [(a, b) for _, _, a, b in sorted(splits)]
    return merges


def llama3_special_tokens(count: int = LLAMA3_NUM_SPECIAL) -> list[str]:
    """Llama-3's special block: the named specials and reserved ones between and after."""
    names, reserved = [], 0
    for offset in range(count):
        if offset in LLAMA3_NAMED_SPECIALS:
            names.append(LLAMA3_NAMED_SPECIALS[offset])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def build_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A Llama-3-style byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` ids.

    Regular tokens fill the ids below the top 256, special ones the top 256; the
    pre-tokenizer, decoder and post-processor (BOS first) are Llama-3's.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    num_regular = vocab_size - LLAMA3_NUM_SPECIAL
    if num_regular < 2048:
        raise ValueError(f"vocab_size {vocab_size} is too small for a Llama-3-style tokenizer")
    vocab = synthetic_vocab(num_regular, seed)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=all_merges(vocab), ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = specials[0]
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, num_regular)])])
    assert tokenizer.token_to_id(bos) == num_regular and tokenizer.get_vocab_size() == vocab_size
    return tokenizer


def tokenizer_config(vocab_size: int) -> dict[str, Any]:
    """tokenizer_config.json as Llama-3-8B-Instruct's: the generic fast class, EOS <|eot_id|>."""
    base = vocab_size - LLAMA3_NUM_SPECIAL
    decoder = {str(base + i): {"content": s, "lstrip": False, "normalized": False,
                               "rstrip": False, "single_word": False, "special": True}
               for i, s in enumerate(llama3_special_tokens())}
    return {"added_tokens_decoder": decoder, "bos_token": LLAMA3_NAMED_SPECIALS[0],
            "chat_template": LLAMA3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": LLAMA3_NAMED_SPECIALS[9],
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "PreTrainedTokenizerFast"}


def write_tokenizer(shape: str, path: str) -> bool:
    """Writes the shape's synthetic tokenizer into ``path``; False if one is there already.

    A tokenizer.json already in the folder (an earlier run's, or a real checkpoint's) is
    kept; it is written last, so an interrupted write is redone. Shapes whose config.json
    names other BOS/EOS ids than the top block's (tiny, qwen3, mpt-7b) then have both in
    the EOS set; C1 ignores EOS, so nothing depends on it.
    """
    from gpu_suite import SHAPES

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return False
    os.makedirs(path, exist_ok=True)
    vocab_size = SHAPES[shape]["vocab_size"]
    tokenizer = build_tokenizer(vocab_size)
    config = tokenizer_config(vocab_size)
    special = {key: {"content": config[key], "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False} for key in ("bos_token", "eos_token")}
    data = json.loads(tokenizer.to_str())
    # Llama-3's file lists merges as "left right" strings (byte-level parts hold no space),
    # indented: tokenizers reads both forms, and the file is then Llama-3's size (~9 MB).
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m)
                               for m in data["model"]["merges"]]
    for name, content in (("tokenizer_config.json", config),
                          ("special_tokens_map.json", special), ("tokenizer.json", data)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    return True


def run_child(code: str, argv: list[str], *, pythonpath: str = REPO_ROOT,
              python_flags: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Runs ``code`` in a new interpreter; returns its JSON result (plus "wall") and stderr.

    The child runs in a neutral folder with ``pythonpath`` first on PYTHONPATH, so it
    imports that kvflow and not one found in the current folder.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    # The child reports its first token against this wall-clock instant, taken just before
    # the spawn, so the interpreter's own start counts too.
    spawn = repr(time.time())
    out = subprocess.run([sys.executable, *python_flags, "-c", code, argv[0], spawn, *argv[1:]],
                         capture_output=True, text=True, check=False, env=env,
                         cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result, out.stderr


def breakdown(r: dict) -> list[tuple[str, float]]:
    """Phases of one kvflow start, in order, adding up to new process -> first token."""
    timers, startup = r["timers"], r["startup"]
    config = timers.get("config", 0.0)
    config_parts = [(k, v) for k, v in timers.items() if k.startswith("config.")]
    tokenizer = timers.get("tokenizer", 0.0) + timers.get("eos ids", 0.0)
    engine_known = config + tokenizer + sum(startup.values())
    rows = [("interpreter start", r["interpreter"]), ("import kvflow", r["import"]),
            ("(benchmark harness)", r["harness"]), ("create_engine_config", config)]
    rows += [("  " + k.removeprefix("config."), v) for k, v in config_parts]
    rows.append(("  (rest of create_engine_config)", config - sum(v for _, v in config_parts)))
    rows += [("tokenizer + EOS ids", tokenizer)]
    rows += [(k.replace("_", " "), v) for k, v in startup.items()]
    rows += [("engine, other", r["engine"] - engine_known), ("first token", r["first_token"])]
    accounted = sum(v for k, v in rows if not k.startswith("  "))
    rows.append(("unaccounted", r["to_first_token"] - accounted))
    rows.append(("**new process -> first token**", r["to_first_token"]))
    return rows


def print_breakdowns(labels: list[str], results: list[dict]) -> None:
    print("| phase s | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    tables = [breakdown(r) for r in results]
    names: list[str] = []
    for t in tables:
        names += [k for k, _ in t if k not in names]
    for name in names:
        cells = []
        for t in tables:
            value = dict(t).get(name)
            cells.append("-" if value is None else f"{value:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def importtime_summary(stderr: str, top: int = 15) -> None:
    """Seconds of import per top-level package (self times summed) and the slowest modules."""
    per_pkg: dict[str, float] = defaultdict(float)
    cumulative: list[tuple[float, str]] = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        self_us, cum_us, indent, name = int(m[1]), int(m[2]), len(m[3]), m[4]
        per_pkg[name.split(".")[0]] += self_us / 1e6
        cumulative.append((cum_us / 1e6, ("  " * (indent // 2)) + name))
    print("\n`-X importtime`, seconds per top-level package (self times summed):\n")
    print("| package | s |\n|---|---|")
    for pkg, s in sorted(per_pkg.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {pkg} | {s:.2f} |")
    print(f"| (all) | {sum(per_pkg.values()):.2f} |")
    print("\nslowest imports (cumulative s, nesting shown by indent):\n")
    for s, name in sorted(cumulative, reverse=True)[:top]:
        print(f"    {s:7.2f}  {name}")


def cprofile_summary(path: str, top: int = 40) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(path, stream=stream)
    stats.strip_dirs().sort_stats("cumulative").print_stats(top)
    print("\ncProfile of one start (top cumulative):\n")
    print("\n".join(line for line in stream.getvalue().splitlines()
                    if line.strip() and "function calls" not in line))


def environment_facts() -> None:
    """What decides cold-start costs outside kvflow: caches, offline flags, bytecode."""
    spec = importlib.util.find_spec("transformers")
    tf_dir = os.path.dirname(spec.origin) if spec and spec.origin else None
    triton_cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".triton", "cache")
    num_cached = len(os.listdir(triton_cache)) if os.path.isdir(triton_cache) else 0
    facts = {
        "python": sys.version.split()[0],
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE"),
        "TRITON_CACHE_DIR": f"{triton_cache} ({num_cached} entries)",
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "transformers dir writable": tf_dir is not None and os.access(tf_dir, os.W_OK),
        "transformers has __pycache__": tf_dir is not None
        and os.path.isdir(os.path.join(tf_dir, "__pycache__")),
    }
    print("environment: " + "; ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


def compile_sources() -> list[str]:
    """Byte-compiles kvflow and every PYTHONPATH entry, as ``pip install`` does; returns them.

    Why: a package installed by pip carries its ``.pyc`` files, but the benchmark's GPU
    machine runs kvflow from a copy of the repository and the carried wheels from a folder
    installed with ``--no-compile``, under ``PYTHONDONTWRITEBYTECODE=1``: every start then
    compiled those modules from source again (on the tokenizer's path: huggingface_hub's
    HTTP stack, 3.7 s of a 12.6 s C1 there). Bytecode written here is only read by the
    starts, not by anything timed.
    """
    import compileall

    roots = [os.path.join(REPO_ROOT, "kvflow")]
    roots += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p and os.path.isdir(p) and os.path.abspath(p) != REPO_ROOT]
    for root in roots:
        compileall.compile_dir(root, quiet=1, workers=0)
    return roots


def main() -> None:
    from gpu_suite import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--dir", default=None, help="checkpoint folder (default /tmp/kvflow-c1-SHAPE)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--runs", type=int, default=2, help="kvflow starts, each a new process")
    ap.add_argument("--dummy", action="store_true",
                    help="config.json only, random weights drawn at start (no checkpoint read)")
    ap.add_argument("--profile", action="store_true",
                    help="also one start under -X importtime and one under cProfile")
    ap.add_argument("--compare", default=None, metavar="DIR",
                    help="also start the kvflow package in DIR (before/after on one machine)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="no tokenizer: start with skip_tokenizer_init=True (C1 before the "
                         "tokenizer was counted)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-compile", action="store_true",
                    help="do not byte-compile kvflow and the PYTHONPATH packages first")
    args = ap.parse_args()
    if args.compare:  # the children run in a neutral folder: a relative path would miss
        args.compare = os.path.abspath(args.compare)
    path = args.dir or os.path.join(tempfile.gettempdir(), f"kvflow-c1-{args.shape}")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    t = time.perf_counter()
    if args.dummy:
        write_config_only(args.shape, path)
    else:
        write_checkpoint(args.shape, path, args.device)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s ({path})", flush=True)
    with_tokenizer = not args.no_tokenizer
    if with_tokenizer:
        t = time.perf_counter()
        written = write_tokenizer(args.shape, path)
        size = os.path.getsize(os.path.join(path, "tokenizer.json")) / 1e6
        print(f"tokenizer {'written' if written else 'already there'} in "
              f"{time.perf_counter() - t:.1f} s (tokenizer.json {size:.1f} MB)", flush=True)
    if not args.no_compile:
        t = time.perf_counter()
        roots = compile_sources()
        print(f"byte-compiled {', '.join(roots)} in {time.perf_counter() - t:.1f} s", flush=True)
    environment_facts()
    child_argv = [path, args.device, dtype, "dummy" if args.dummy else "auto",
                  "1" if with_tokenizer else "0"]

    labels, results = [], []
    for pythonpath, name in ([(args.compare, "compare")] if args.compare else []) + [
            (REPO_ROOT, "kvflow")]:
        for i in range(args.runs):
            r, _ = run_child(KVFLOW_CHILD, child_argv + [""], pythonpath=pythonpath)
            labels.append(f"{name} start {i + 1}")
            results.append(r)
            print(f"{labels[-1]}: {r['to_first_token']:.2f} s to first token (tokenizer "
                  f"loaded: {r.get('tokenizer_loaded')}, transformers imported: "
                  f"{r.get('transformers_imported')})", flush=True)
    print()
    print_breakdowns(labels, results)
    if args.profile:
        _, err = run_child(KVFLOW_CHILD, child_argv + [""], python_flags=("-X", "importtime"))
        importtime_summary(err)
        with tempfile.NamedTemporaryFile(suffix=".prof", delete=False) as f:
            prof_path = f.name
        run_child(KVFLOW_CHILD, child_argv + [prof_path])
        cprofile_summary(prof_path)
    if not args.skip_hf and not args.dummy:
        r, _ = run_child(HF_CHILD, [path, args.device, dtype, "1" if with_tokenizer else "0"])
        tok = "-" if r["tokenizer"] is None else f"{r['tokenizer']:.2f}"
        print("\n| engine | interpreter s | import torch s | import transformers s | tokenizer s | "
              "load s | first token s | new process -> first token s |\n"
              "|---|---|---|---|---|---|---|---|")
        print(f"| HF from_pretrained + generate | {r['interpreter']:.2f} | {r['import torch']:.2f} "
              f"| {r['import transformers']:.2f} | {tok} | {r['load']:.2f} | "
              f"{r['first_token']:.2f} | {r['to_first_token']:.2f} |")


if __name__ == "__main__":
    main()
