"""generation_config.json's sampling settings as request defaults, as vLLM's
``--generation-config auto``: read, validated, applied offline (the server: its tests)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import tiny_models
from kvflow import SamplingParams
from kvflow.generation_defaults import read_generation_defaults
from tiny_models import LLM32 as LLM


def _with_generation_config(src: str, dst: str, **settings) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "generation_config.json")
    config = json.load(open(path)) if os.path.isfile(path) else {}
    config.update(settings)
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


def test_read_keeps_vllm_keys_renames_and_validates(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_new_tokens": 256,
        "do_sample": True, "eos_token_id": [1, 2], "repetition_penalty": 1}))
    expected = {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_tokens": 256,
                "repetition_penalty": 1.0}
    assert read_generation_defaults(str(tmp_path), "auto") == expected
    assert read_generation_defaults("/elsewhere", str(tmp_path)) == expected
    assert read_generation_defaults("/elsewhere", str(tmp_path / "generation_config.json")) == expected
    assert read_generation_defaults(str(tmp_path), "vllm") == {}
    assert read_generation_defaults(str(tmp_path / "none"), "auto") == {}
    with pytest.raises(ValueError, match=r"generation_config='/nope'.*'vllm'"):
        read_generation_defaults(str(tmp_path), "/nope")
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 2.5}))
    with pytest.raises(ValueError, match=r"top_k=2.5 is not an integer"):
        read_generation_defaults(str(tmp_path), "auto")
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ValueError, match=r"temperature='hot' is not a number"):
        read_generation_defaults(str(tmp_path), "auto")


def test_offline_defaults_follow_the_model_unless_vllm(checkpoint, tmp_path):
    path = _with_generation_config(checkpoint("llama"), str(tmp_path / "m"), temperature=0.0,
                                   max_new_tokens=5)
    prompts = tiny_models.random_prompts(420, [3, 17, 40])
    llm = LLM(path, max_model_len=128)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0.0, 5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    greedy = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in outs] == greedy  # the model's greedy default
    plain = LLM(path, max_model_len=128, generation_config="vllm").get_default_sampling_params()
    assert (plain.temperature, plain.max_tokens) == (1.0, SamplingParams().max_tokens)


def test_override_generation_config_goes_on_top(checkpoint, tmp_path):
    path = _with_generation_config(checkpoint("llama"), str(tmp_path / "m"), temperature=0.6,
                                   top_p=0.9)
    llm = LLM(path, max_model_len=128, override_generation_config={"temperature": 0.0,
                                                                   "max_new_tokens": 3})
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (0.0, 0.9, 3)
    plain = LLM(path, max_model_len=128, generation_config="vllm",
                override_generation_config={"top_k": 5}).get_default_sampling_params()
    assert (plain.temperature, plain.top_k) == (1.0, 5)
    with pytest.raises(ValueError, match=r"override_generation_config: top_k='x' is not an integer"):
        LLM(path, override_generation_config={"top_k": "x"})

