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

from dataclasses import dataclass
from typing import Any, Callable

Accepts = Callable[[Any], bool]


def _any(_: Any) -> bool:
    return True


def _one_of(*values: Any) -> Accepts:
    return lambda v: v in values


def _falsy(v: Any) -> bool:
    return not v


@dataclass(frozen=True)
class InertOption:
    """A vLLM option kvflow has no machinery for."""

    accepts: Accepts
    """True for the values that leave kvflow's behaviour what the script expects."""
    why: str
    """Why other values are refused (what to do instead)."""
    kind: str
    """How ``kvflow serve`` parses it: "flag" (bool switch), "int", "str" or "json"."""


def _opt(accepts: Accepts, kind: str, why: str = "") -> InertOption:
    return InertOption(accepts, why, kind)


INERT_OPTIONS: dict[str, InertOption] = {
    "task": _opt(_one_of("auto", "generate"), "str",
                 "kvflow serves text generation only (no embed/classify/score/reward tasks)"),
    "max_seq_len_to_capture": _opt(_any, "int"),  # kvflow's CUDA graphs serve every length
    "max_context_len_to_capture": _opt(_any, "int"),
    "num_scheduler_steps": _opt(_one_of(1), "int", "multi-step scheduling is not implemented; "
                                "async_scheduling overlaps the host with the GPU instead"),
    "use_v2_block_manager": _opt(_any, "flag"),  # deprecated in vLLM, no effect there either
    "disable_async_output_proc": _opt(_any, "flag"),  # kvflow's knob is async_scheduling
    "worker_use_ray": _opt(_falsy, "flag", "use distributed_executor_backend='ray'"),
    "scheduling_policy": _opt(_one_of("fcfs"), "str",
                              "requests are scheduled first come, first served"),
    "max_num_partial_prefills": _opt(_one_of(1), "int", "use long_prefill_token_threshold "
                                     "to spread long prompts over steps"),
    "max_long_partial_prefills": _opt(_one_of(1), "int", "use long_prefill_token_threshold"),
    "enable_lora": _opt(_falsy, "flag", "LoRA adapters are not supported"),
    "enable_prompt_adapter": _opt(_falsy, "flag", "prompt adapters are not supported"),
    "enable_sleep_mode": _opt(_falsy, "flag", "sleep mode is not supported"),
    "disable_sliding_window": _opt(_falsy, "flag",
                                   "the sliding window is part of the model (Mistral)"),
    "guided_decoding_backend": _opt(_any, "str"),  # structured requests are refused one by one
    "compilation_config": _opt(_any, "json"),  # kvflow's speed is Triton + CUDA graphs
    "hf_overrides": _opt(_falsy, "json", "config overrides are not supported; edit config.json"),
    "rope_scaling": _opt(_falsy, "json", "set rope_scaling in config.json"),
    "mm_processor_kwargs": _opt(_falsy, "json", "kvflow serves text models"),
    "limit_mm_per_prompt": _opt(_falsy, "json", "kvflow serves text models"),
    "calculate_kv_scales": _opt(_falsy, "flag", "there is no fp8 KV cache to scale"),
    "code_revision": _opt(_falsy, "str", "kvflow never runs a checkpoint's code"),
    "model_impl": _opt(_one_of("auto", "vllm"), "str", "kvflow has its own implementations only"),
    "config_format": _opt(_one_of("auto", "hf"), "str", "config.json (HF format) is read"),
}
"""option -> what kvflow accepts of it, why not otherwise, and its command-line kind."""


def drop_inert_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the inert vLLM options; a ValueError for a value kvflow cannot honour."""
    kept = {}
    for name, value in kwargs.items():
        option = INERT_OPTIONS.get(name)
        if option is None:
            kept[name] = value
        elif not option.accepts(value):
            raise ValueError(f"{name}={value!r} is not supported by kvflow: {option.why}.")
    return kept


PER_CALL_WHY: dict[str, str] = {
    "lora_request": INERT_OPTIONS["enable_lora"].why,
    "prompt_adapter_request": INERT_OPTIONS["enable_prompt_adapter"].why,
    "guided_options_request": "guided (structured) decoding is not supported",
    "mm_processor_kwargs": INERT_OPTIONS["mm_processor_kwargs"].why,
}
"""vLLM's per-call arguments of ``LLM.generate``/``chat``/``beam_search`` for the same
missing machinery as the engine options above, and why a set value is refused."""


def refuse_per_call_options(**options: Any) -> None:
    """A ValueError for any of ``PER_CALL_WHY``'s arguments that is set (unset is fine)."""
    for name, value in options.items():
        if value:
            raise ValueError(f"{name}={value!r} is not supported by kvflow: "
                             f"{PER_CALL_WHY[name]}.")
