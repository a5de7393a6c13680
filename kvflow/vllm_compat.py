"""vLLM engine options kvflow has no use for: accepted where they change nothing here.

Scripts written for vLLM pass options that tune machinery kvflow does not have
(``max_seq_len_to_capture``, ``num_scheduler_steps``), switch off features it
lacks (``enable_lora=False``) or were deprecated upstream (``use_v2_block_manager``).
A drop-in must run those scripts, and must not pretend to honour a value that would
change the results: each option below names the values that leave kvflow's behaviour
what the script expects; any other value is a ``ValueError`` saying why. Options in
neither this table nor ``EngineArgs`` stay unknown (an error listing the known ones).
"""

from __future__ import annotations

from typing import Any, Callable

Accepts = Callable[[Any], bool]


def _any(_: Any) -> bool:
    return True


def _one_of(*values: Any) -> Accepts:
    return lambda v: v in values


def _falsy(v: Any) -> bool:
    return not v


INERT_OPTIONS: dict[str, tuple[Accepts, str]] = {
    "task": (_one_of("auto", "generate"),
             "kvflow serves text generation only (no embed/classify/score/reward tasks)"),
    "max_seq_len_to_capture": (_any, ""),  # kvflow's CUDA graphs serve every length
    "max_context_len_to_capture": (_any, ""),
    "num_scheduler_steps": (_one_of(1), "multi-step scheduling is not implemented; "
                            "async_scheduling overlaps the host with the GPU instead"),
    "use_v2_block_manager": (_any, ""),  # deprecated in vLLM, no effect there either
    "disable_async_output_proc": (_any, ""),  # kvflow's overlap knob is async_scheduling
    "worker_use_ray": (_falsy, "use distributed_executor_backend='ray'"),
    "scheduling_policy": (_one_of("fcfs"), "requests are scheduled first come, first served"),
    "max_num_partial_prefills": (_one_of(1), "use long_prefill_token_threshold to spread "
                                 "long prompts over steps"),
    "max_long_partial_prefills": (_one_of(1), "use long_prefill_token_threshold"),
    "enable_lora": (_falsy, "LoRA adapters are not supported"),
    "enable_prompt_adapter": (_falsy, "prompt adapters are not supported"),
    "enable_sleep_mode": (_falsy, "sleep mode is not supported"),
    "disable_sliding_window": (_falsy, "the sliding window is part of the model (Mistral)"),
    "guided_decoding_backend": (_any, ""),  # structured requests are refused per request
    "compilation_config": (_any, ""),  # kvflow's speed comes from Triton + CUDA graphs
    "hf_overrides": (_falsy, "config overrides are not supported; edit config.json"),
    "rope_scaling": (_falsy, "set rope_scaling in config.json"),
    "override_generation_config": (_falsy, "use generation_config=<folder> with the "
                                   "settings in its generation_config.json"),
    "mm_processor_kwargs": (_falsy, "kvflow serves text models"),
    "limit_mm_per_prompt": (_falsy, "kvflow serves text models"),
    "calculate_kv_scales": (_falsy, "there is no fp8 KV cache to scale"),
    "code_revision": (_falsy, "kvflow never runs a checkpoint's code"),
    "model_impl": (_one_of("auto", "vllm"), "kvflow has its own implementations only"),
    "config_format": (_one_of("auto", "hf"), "config.json (HF format) is read"),
}
"""option -> (accepts(value), why other values are refused)."""


def drop_inert_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the inert vLLM options; a ValueError for a value kvflow cannot honour."""
    kept = {}
    for name, value in kwargs.items():
        rule = INERT_OPTIONS.get(name)
        if rule is None:
            kept[name] = value
        elif not rule[0](value):
            raise ValueError(f"{name}={value!r} is not supported by kvflow: {rule[1]}.")
    return kept
