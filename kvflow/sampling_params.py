"""SamplingParams: how to pick tokens and when to stop, with vLLM's field names.

It is a dataclass on purpose: LangChain filters its keyword arguments through
``SamplingParams.__annotations__``, so every field must be annotated here.
Validation runs in ``__post_init__`` and raises a ``ValueError`` that names the
field, the value and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

_GREEDY_EPS = 1e-5


class RequestOutputKind(Enum):
    """What each output of a request carries (vLLM's ``vllm.sampling_params`` enum; set it
    as ``SamplingParams.output_kind`` or pass it to the engine)."""

    CUMULATIVE = 0
    """Every output carries the whole text so far (vLLM's default)."""
    DELTA = 1
    """Every output carries only what is new since the last one (streaming)."""
    FINAL_ONLY = 2
    """One output, when the request ends (LLM.generate)."""


class SamplingType(Enum):
    GREEDY = "greedy"
    RANDOM = "random"
    RANDOM_SEED = "random_seed"


def _range_error(name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{name} must be {rule}, got {value!r}.")


@dataclass
class SamplingParams:
    """Sampling and stopping options of one request (vLLM's names and defaults)."""

    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    truncate_prompt_tokens: Optional[int] = None
    output_kind: Optional[Any] = None
    logits_processors: Optional[list[Any]] = None
    """vLLM's field: accepted unset only (vLLM's V1 engine refuses per-request callables too)."""
    guided_decoding: Optional[Any] = None
    """vLLM's field: accepted unset only (structured decoding is not implemented)."""
    extra_args: Optional[dict[str, Any]] = None
    """Carried for plugins, as in vLLM; kvflow's sampling reads none of it."""
    # Filled by the engine: end-of-sequence ids from the tokenizer/generation config.
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if self.logprobs is True:  # OpenAI's boolean form
            self.logprobs = 1
        if self.logprobs is False:
            self.logprobs = None
        if self.seed is not None and not isinstance(self.seed, int):
            raise _range_error("seed", self.seed, "an integer or None")
        self._verify()

    def _verify(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise _range_error("n", self.n, "an integer >= 1")
        if self.best_of is not None and (self.best_of < self.n):
            raise _range_error("best_of", self.best_of, f"None or >= n ({self.n})")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _range_error("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _range_error("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            raise _range_error("repetition_penalty", self.repetition_penalty, "> 0")
        if self.temperature < 0.0:
            raise _range_error("temperature", self.temperature, ">= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise _range_error("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise _range_error("top_k", self.top_k, "-1 or 0 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise _range_error("min_p", self.min_p, "in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise _range_error("max_tokens", self.max_tokens, "None or an integer >= 1")
        if self.min_tokens < 0:
            raise _range_error("min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _range_error("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            raise _range_error("logprobs", self.logprobs, "None or >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise _range_error("prompt_logprobs", self.prompt_logprobs, "None or >= 0")
        if any(not s for s in self.stop):  # type: ignore[union-attr]
            raise _range_error("stop", self.stop, "a list of non-empty strings")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise _range_error("truncate_prompt_tokens", self.truncate_prompt_tokens, ">= 1")
        if self.logits_processors:
            raise ValueError("logits_processors is not supported: per-request logits processors "
                             "are refused (as by vLLM's V1 engine); use logit_bias, "
                             "allowed_token_ids or bad_words.")
        if self.guided_decoding is not None:
            raise ValueError("guided_decoding is not supported: kvflow has no structured "
                             "(guided) decoding; leave it None.")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise _range_error("extra_args", self.extra_args, "None or a dict")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _GREEDY_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    def update_from_tokenizer(self, eos_token_ids: set[int]) -> None:
        """Adds the model's EOS ids (unless ``ignore_eos``) to the stop ids."""
        ids = set(self.stop_token_ids or [])
        if not self.ignore_eos:
            ids |= eos_token_ids
        self._all_stop_token_ids = ids
        self._eos_token_ids = set(eos_token_ids)

    @property
    def eos_token_ids(self) -> set[int]:
        return getattr(self, "_eos_token_ids", set())

    def clone(self) -> "SamplingParams":
        import copy

        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """Options of ``LLM.beam_search`` (vLLM's ``BeamSearchParams``)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    """Scales the logits the beams' log-probabilities come from (0 or 1: unscaled)."""
    length_penalty: float = 1.0
    """A beam scores cum_logprob / len(prompt + beam) ** length_penalty (0: plain sum)."""
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise _range_error("beam_width", self.beam_width, "an integer >= 1")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise _range_error("max_tokens", self.max_tokens, "an integer >= 1")
        if self.temperature < 0.0:
            raise _range_error("temperature", self.temperature, ">= 0")

