"""Bad input: a clear ValueError before anything is queued; the engine keeps serving."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from kvflow import EngineArgs, SamplingParams
from tiny_models import LLM32 as LLM


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("llama"), max_model_len=64)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(logits_processors=[lambda ids, logits: logits]), "logits_processors"),
    (dict(guided_decoding={"json": {}}), "guided_decoding"),
    (dict(extra_args=["x"]), "extra_args"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_compat():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams().max_tokens == 16
    assert SamplingParams(stop="x").stop == ["x"]
    names = set(SamplingParams.__annotations__)
    assert {"n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
            "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
            "skip_special_tokens", "spaces_between_special_tokens",
            "include_stop_str_in_output", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logits_processors", "guided_decoding", "extra_args"} <= names
    # vLLM's fields for machinery kvflow lacks, at the values that leave sampling as it is:
    params = SamplingParams(logits_processors=[], guided_decoding=None,
                            extra_args={"plugin": 1})
    assert params.extra_args == {"plugin": 1}


def _assert_engine_clean_and_serving(llm):
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_blocks
    out = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_prompt_too_long(llm):
    with pytest.raises(ValueError, match=r"100 tokens.*max_model_len=64"):
        llm.generate({"prompt_token_ids": [5] * 100}, use_tqdm=False)
    _assert_engine_clean_and_serving(llm)


def test_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["Hello", {"prompt_token_ids": []}], use_tqdm=False)
    _assert_engine_clean_and_serving(llm)


def test_token_ids_outside_vocab(llm):
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"outside"):
        llm.generate({"prompt_token_ids": [1, -3]}, use_tqdm=False)
    # An out-of-vocabulary stop id would fail the whole batch's step under min_tokens.
    with pytest.raises(ValueError, match=r"stop_token_ids.*outside"):
        llm.generate("Hi", SamplingParams(stop_token_ids=[10**6], min_tokens=2), use_tqdm=False)
    _assert_engine_clean_and_serving(llm)


def test_logprobs_over_limit_and_mismatched_params(llm):
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate("Hi", SamplingParams(logprobs=50), use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate(["a", "b", "c"], [SamplingParams()] * 2, use_tqdm=False)
    _assert_engine_clean_and_serving(llm)


def test_unknown_engine_option_and_bad_values(checkpoint):
    path = checkpoint("llama")
    with pytest.raises(ValueError, match=r"Unknown engine option.*not_an_option"):
        LLM(path, not_an_option=1)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(path, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="block_size"):
        LLM(path, block_size=3)
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="float8")
    with pytest.raises(ValueError, match=r"max_model_len=100000.*512"):
        LLM(path, max_model_len=100000)
    with pytest.raises(ValueError, match="quantization"):
        LLM(path, quantization="gptq")
    with pytest.raises(ValueError, match=r"awq.*unquantized"):
        LLM(path, quantization="awq")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3.*4 attention heads"):
        EngineArgs(model=path, tensor_parallel_size=3).create_engine_config()
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        LLM(path, max_model_len=256, num_gpu_blocks_override=4)


def test_vllm_kv_cache_dtype_and_pipeline_parallel_options(checkpoint):
    """vLLM scripts pass these; what kvflow can honour works, the rest says why not."""
    path = checkpoint("llama")
    config = EngineArgs(model=path, dtype="float32", kv_cache_dtype="auto",
                        pipeline_parallel_size=1).create_engine_config()
    assert config.model_config.dtype == torch.float32
    EngineArgs(model=path, dtype="float32", kv_cache_dtype="float32").create_engine_config()
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8'.*no fp8 KV cache"):
        EngineArgs(model=path, kv_cache_dtype="fp8").create_engine_config()
    with pytest.raises(ValueError, match=r"kv_cache_dtype='float16' differs.*float32"):
        EngineArgs(model=path, dtype="float32", kv_cache_dtype="float16").create_engine_config()
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2.*tensor_parallel_size"):
        LLM(path, pipeline_parallel_size=2)


def test_missing_folder_and_unknown_architecture(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint("llama"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(bad))


def test_skip_tokenizer_init_takes_ids_only(checkpoint):
    llm = LLM(checkpoint("llama"), max_model_len=64, skip_tokenizer_init=True)
    out = llm.generate({"prompt_token_ids": [1, 5, 6]},
                       SamplingParams(max_tokens=3, ignore_eos=True, detokenize=False),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate("text", use_tqdm=False)


def test_dummy_load_format_needs_only_config(tmp_path, checkpoint):
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    shutil.copy(os.path.join(checkpoint("llama"), "config.json"), cfg_only / "config.json")
    llm = LLM(str(cfg_only), load_format="dummy", skip_tokenizer_init=True, max_model_len=64)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_inert_vllm_options_run_and_the_rest_say_why(checkpoint):
    path = checkpoint("llama")
    llm = LLM(path, max_model_len=128, task="generate", enable_lora=False,
              max_seq_len_to_capture=8192, use_v2_block_manager=True, worker_use_ray=False,
              scheduling_policy="fcfs", num_scheduler_steps=1, disable_sliding_window=False,
              compilation_config=3, hf_overrides={}, guided_decoding_backend="xgrammar")
    out = llm.generate({"prompt_token_ids": [1, 5, 6]}, SamplingParams(max_tokens=2),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match=r"enable_lora=True is not supported.*LoRA"):
        LLM(path, enable_lora=True)
    with pytest.raises(ValueError, match=r"task='embed'.*text generation only"):
        LLM(path, task="embed")
    with pytest.raises(ValueError, match=r"worker_use_ray=True.*distributed_executor_backend"):
        LLM(path, worker_use_ray=True)
    with pytest.raises(ValueError, match=r"scheduling_policy='priority'"):
        LLM(path, scheduling_policy="priority")
    with pytest.raises(ValueError, match=r"Unknown engine option.*not_a_vllm_option"):
        LLM(path, not_a_vllm_option=1)
