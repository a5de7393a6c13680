"""The engine and sampling options of kvflow's LangChain models, and how calls reach the engine.

``KVFlowOptions`` holds the fields of ``langchain_community.llms.VLLM`` (same
names, same defaults), builds the ``kvflow.LLM`` they describe, turns a call's
``stop`` and keyword arguments into one ``SamplingParams``, and runs requests
through a ``SharedEngine``: whole batches, token-delta streams, blocking or
asyncio. ``VLLM`` and ``ChatKVFlow`` add only the LangChain types around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Iterator, Optional, Sequence

from langchain_core.language_models import LangSmithParams
from pydantic import BaseModel, Field, PrivateAttr

from kvflow.engine.llm_engine import PromptType
from kvflow.engine.output_processor import RequestOutputKind
from kvflow.entrypoints.llm import LLM
from kvflow.integrations.langchain.shared_engine import SharedEngine
from kvflow.outputs import CompletionOutput, RequestOutput
from kvflow.sampling_params import SamplingParams

# output_kind is the call path's choice (a stream needs deltas), not the caller's.
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)
                             if not f.name.startswith("_")) - {"output_kind"}

_BEAM_SEARCH_ERROR = (
    "use_beam_search=True: kvflow has no beam search (vLLM removed it from SamplingParams "
    "too). Leave use_beam_search=False; use temperature=0 for greedy decoding, or n > 1 to "
    "sample several candidates.")


class KVFlowOptions(BaseModel):
    """Fields and engine plumbing shared by ``VLLM`` and ``ChatKVFlow``.

    The engine starts when the object is built (as with LangChain's own VLLM),
    so a bad model path or option fails there, not at the first call. Pass an
    existing ``kvflow.LLM`` as ``client`` to reuse its loaded engine (say, a
    ``VLLM`` and a ``ChatKVFlow`` on one model); ``SharedEngine`` then orders
    the calls of every LangChain object on it, though not the client's own.
    """

    model: str = ""
    """A Hugging Face hub id, a local checkpoint folder or a .gguf file."""

    tensor_parallel_size: Optional[int] = 1
    """Number of tensor-parallel workers (GPUs) the model is split across."""

    trust_remote_code: Optional[bool] = False
    """Passed to kvflow.LLM for the tokenizer; kvflow runs its own model code either way."""

    n: int = 1
    """Sequences sampled per prompt; ``generate`` returns all of them, ``invoke`` the first."""

    best_of: Optional[int] = None
    """vLLM's best_of; kvflow accepts only None or a value equal to n."""

    presence_penalty: float = 0.0
    """Penalty in [-2, 2] on tokens that already appeared in the output."""

    frequency_penalty: float = 0.0
    """Penalty in [-2, 2] growing with how often a token appeared in the output."""

    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set whose probability reaches top_p."""

    top_k: int = -1
    """Keep only the k most likely tokens; -1 keeps all."""

    use_beam_search: bool = False
    """Kept for compatibility with LangChain's VLLM; True is rejected (no beam search)."""

    stop: Optional[list[str]] = None
    """Strings that end generation (not included in the text); a call's ``stop`` replaces them."""

    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""

    max_new_tokens: int = 512
    """Most tokens generated per sequence (SamplingParams.max_tokens)."""

    logprobs: Optional[int] = None
    """Top log probabilities to report per generated token, in ``generation_info``."""

    dtype: str = "auto"
    """Weight and activation dtype; "auto" is float32 on CPU, float16 or bfloat16 on GPU."""

    download_dir: Optional[str] = None
    """Where hub checkpoints are downloaded; None uses the Hugging Face cache."""

    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further ``kvflow.LLM`` engine options under vLLM's names (max_model_len, seed,
    quantization, enable_prefix_caching, ...)."""

    client: Any = None
    """The ``kvflow.LLM`` running the model; built from the fields above when None."""

    _shared: Optional[SharedEngine] = PrivateAttr(default=None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _reject_unknown_fields(cls, data: dict[str, Any]) -> None:
        """LangChain's VLLM drops unknown names silently (``max_tokens=`` does nothing
        there); a typo should fail loudly instead."""
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            hint = " (the token limit is max_new_tokens)" if "max_tokens" in unknown else ""
            raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}{hint}. Fields: "
                             f"{sorted(cls.model_fields)}; engine options go in vllm_kwargs.")

    def _start_engine(self) -> None:
        if self.use_beam_search:
            raise ValueError(_BEAM_SEARCH_ERROR)
        if self.client is None:
            # LangChain's VLLM types these two Optional; None means the default.
            tp = 1 if self.tensor_parallel_size is None else self.tensor_parallel_size
            named: dict[str, Any] = {
                "model": self.model, "tensor_parallel_size": tp,
                "trust_remote_code": bool(self.trust_remote_code), "dtype": self.dtype,
                "download_dir": self.download_dir}
            repeated = sorted(set(named) & set(self.vllm_kwargs))
            if repeated:
                raise ValueError(f"vllm_kwargs repeats {repeated}, which are fields of "
                                 f"{type(self).__name__}; set them there, not in vllm_kwargs.")
            self.client = LLM(**named, **self.vllm_kwargs)
        self._shared = SharedEngine.of(self.client)

    @property
    def _engine(self) -> SharedEngine:
        assert self._shared is not None, "_start_engine runs in __init__"
        return self._shared

    # ------------------------------------------------------------------ parameters
    @property
    def _default_params(self) -> dict[str, Any]:
        """The fields as SamplingParams-style keywords (LangChain VLLM's names for them)."""
        return {
            "n": self.n, "best_of": self.best_of, "max_tokens": self.max_new_tokens,
            "top_k": self.top_k, "top_p": self.top_p, "temperature": self.temperature,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "stop": self.stop,
            "ignore_eos": self.ignore_eos, "use_beam_search": self.use_beam_search,
            "logprobs": self.logprobs,
        }

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, **self._default_params}

    def _sampling_params(self, stop: Optional[list[str]], kwargs: dict[str, Any]
                         ) -> SamplingParams:
        """One call's SamplingParams: the fields, overridden by the call's keywords and stop.

        Keywords take SamplingParams names (``max_new_tokens`` is accepted too);
        an unknown one is a ValueError, where LangChain's VLLM would drop it.
        """
        overrides = dict(kwargs)
        if overrides.pop("lora_request", None) is not None:
            raise ValueError("lora_request: kvflow does not serve LoRA adapters yet; "
                             "merge the adapter into the checkpoint instead.")
        if "max_new_tokens" in overrides:
            if "max_tokens" in overrides:
                raise ValueError("Pass max_new_tokens or max_tokens, not both.")
            overrides["max_tokens"] = overrides.pop("max_new_tokens")
        values = {**self._default_params, **overrides}
        if values.pop("use_beam_search"):
            raise ValueError(_BEAM_SEARCH_ERROR)
        if stop is not None:
            values["stop"] = stop
        unknown = sorted(set(values) - _SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"Unknown sampling option(s) {unknown}. Known: "
                             f"{sorted(_SAMPLING_FIELDS | {'max_new_tokens'})}.")
        return SamplingParams(**values)

    def _ls_params(self, base: LangSmithParams, params: dict[str, Any]) -> LangSmithParams:
        """Tracing metadata with kvflow as provider and the real token limit."""
        base["ls_provider"] = "kvflow"
        base["ls_model_name"] = self.model
        base["ls_max_tokens"] = params.get("max_tokens", params.get("max_new_tokens",
                                                                    self.max_new_tokens))
        return base

    # ------------------------------------------------------------------ engine calls
    def _generate_finals(self, prompts: Sequence[PromptType], params: SamplingParams
                         ) -> list[RequestOutput]:
        """All prompts in one engine batch, blocking; outputs in prompt order."""
        with self._engine.sync_use():
            return self.client.generate(list(prompts), params, use_tqdm=False)

    async def _agenerate_finals(self, prompts: Sequence[PromptType], params: SamplingParams
                                ) -> list[RequestOutput]:
        """All prompts on the async engine at once, so its steps batch them."""

        async def one(prompt: PromptType) -> RequestOutput:
            async with self._engine.async_use() as async_llm:
                final: Optional[RequestOutput] = None
                async with aclosing(async_llm.generate(
                        prompt, params, _new_request_id(),
                        output_kind=RequestOutputKind.FINAL_ONLY)) as outputs:
                    async for out in outputs:
                        final = out
                assert final is not None, "AsyncLLM.generate ends with the final output"
                return final

        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One bad prompt (or a cancellation) ends the call: abort the others too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _stream_deltas(self, prompt: PromptType, params: SamplingParams
                       ) -> Iterator[CompletionOutput]:
        """What each engine step adds to the one sequence, blocking.

        Holds the engine until the stream ends or is closed; closing it early
        aborts the request and frees its KV blocks.
        """
        _check_streamable(params)
        with self._engine.sync_use() as engine:
            request_id = _new_request_id()
            engine.add_request(request_id, prompt, params, output_kind=RequestOutputKind.DELTA)
            finished = False
            try:
                while not finished and engine.has_unfinished_requests():
                    for out in engine.step():
                        # While we own the engine every output is ours; the check is cheap.
                        if out.request_id == request_id:
                            finished = out.finished
                            yield from out.outputs
            finally:
                if not finished:
                    engine.abort_request(request_id)

    async def _astream_deltas(self, prompt: PromptType, params: SamplingParams
                              ) -> AsyncIterator[CompletionOutput]:
        """What each engine step adds to the one sequence, from the async engine.

        The request runs in a task of its own that feeds a queue, so the async
        session ends when the request does. LangChain's ``astream`` does not
        close this generator when its caller stops early; the generator then
        lingers until garbage collection, and were it to hold the session, a
        blocking call on another thread would wait that long. Closing it
        (or its collection) cancels the task, which aborts the request.
        """
        _check_streamable(params)
        deltas: asyncio.Queue = asyncio.Queue()  # CompletionOutput, then None or an error

        async def produce() -> None:
            try:
                async with self._engine.async_use() as async_llm:
                    async with aclosing(async_llm.generate(
                            prompt, params, _new_request_id(),
                            output_kind=RequestOutputKind.DELTA)) as outputs:
                        async for out in outputs:
                            for completion in out.outputs:
                                deltas.put_nowait(completion)
            except Exception as exc:  # bad input, a failed step: the consumer re-raises it
                deltas.put_nowait(exc)
            else:
                deltas.put_nowait(None)

        producer = asyncio.ensure_future(produce())
        try:
            while (item := await deltas.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            producer.cancel()  # a no-op once the request ended
            await asyncio.gather(producer, return_exceptions=True)


# ---------------------------------------------------------------------- helpers
def _new_request_id() -> str:
    # LLM.generate numbers its own requests 0, 1, ...; a prefix keeps ours apart.
    return f"langchain-{uuid.uuid4().hex}"


def _check_streamable(params: SamplingParams) -> None:
    if params.n != 1:
        raise ValueError(f"Streaming returns one sequence, but n={params.n}. Use n=1 to "
                         "stream, or invoke/generate to get n sequences.")


def is_worth_a_chunk(delta: CompletionOutput, params: SamplingParams) -> bool:
    """A step's delta may carry no text (held back until a stop string can be ruled
    out, or half a UTF-8 character); it still matters if it ends the sequence or
    carries asked-for log probabilities."""
    return bool(delta.text or delta.finish_reason is not None
                or (params.logprobs is not None and delta.token_ids))


def token_usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    """OpenAI-style counts; a prompt counts once however many sequences it got."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def generation_info(completion: CompletionOutput) -> dict[str, Any]:
    """finish_reason and stop_reason once the sequence ended; logprobs when asked for.

    Streamed chunks carry the finish fields only on the last chunk: LangChain
    merges chunks by concatenating string values.
    """
    info: dict[str, Any] = {}
    if completion.finish_reason is not None:
        info["finish_reason"] = completion.finish_reason
        info["stop_reason"] = completion.stop_reason
    if completion.logprobs is not None:
        info["logprobs"] = logprobs_info(completion)
    return info


def logprobs_info(completion: CompletionOutput) -> dict[str, Any]:
    """Per-token log probabilities in the shape of OpenAI chat's ``logprobs.content``,
    plus token ids: decoded token texts alone collide (byte tokens often all read "�")."""
    assert completion.logprobs is not None, "called only when logprobs were asked for"
    content = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
        chosen = candidates[token_id]
        ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank or 0)
        content.append({
            "token": chosen.decoded_token, "token_id": token_id, "logprob": chosen.logprob,
            "top_logprobs": [{"token": lp.decoded_token, "token_id": tid, "logprob": lp.logprob}
                             for tid, lp in ranked],
        })
    return {"content": content}
