"""VLLM: LangChain's completion-model interface over kvflow, field for field like LangChain's VLLM.

    from kvflow.integrations.langchain import VLLM   # was: from langchain_community.llms import VLLM
    llm = VLLM(model="mosaicml/mpt-7b", max_new_tokens=128, temperature=0.8)
    llm.invoke("What is the capital of France?")

Beyond LangChain's class: every sequence of ``n`` comes back, ``generation_info``
has finish_reason/stop_reason (and logprobs), ``llm_output`` has token usage,
``stream``/``astream`` yield what each engine step adds, and ``ainvoke``/
``abatch`` run on kvflow's AsyncLLM rather than in a thread.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.llms import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from kvflow.integrations.langchain.options import (
    KVFlowOptions,
    generation_info,
    is_worth_a_chunk,
    token_usage,
)
from kvflow.outputs import RequestOutput


class VLLM(KVFlowOptions, BaseLLM):
    """A kvflow engine as a LangChain LLM; one ``generate`` call is one engine batch."""

    def __init__(self, **data: Any) -> None:
        self._reject_unknown_fields(data)
        super().__init__(**data)
        self._start_engine()

    @property
    def _llm_type(self) -> str:
        return "kvflow"

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any
                       ) -> LangSmithParams:
        return self._ls_params(super()._get_ls_params(stop=stop, **kwargs), kwargs)

    def _result(self, outputs: Sequence[RequestOutput]) -> LLMResult:
        generations = [[Generation(text=c.text, generation_info=generation_info(c))
                        for c in out.outputs] for out in outputs]
        return LLMResult(generations=generations,
                         llm_output={"token_usage": token_usage(outputs), "model_name": self.model})

    def _generate(self, prompts: list[str], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None,
                  **kwargs: Any) -> LLMResult:
        params = self._sampling_params(stop, kwargs)
        return self._result(self._generate_finals(prompts, params))

    async def _agenerate(self, prompts: list[str], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                         **kwargs: Any) -> LLMResult:
        params = self._sampling_params(stop, kwargs)
        return self._result(await self._agenerate_finals(prompts, params))

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        params = self._sampling_params(stop, kwargs)
        for delta in self._stream_deltas(prompt, params):
            if not is_worth_a_chunk(delta, params):
                continue
            chunk = GenerationChunk(text=delta.text, generation_info=generation_info(delta) or None)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        params = self._sampling_params(stop, kwargs)
        async for delta in self._astream_deltas(prompt, params):
            if not is_worth_a_chunk(delta, params):
                continue
            chunk = GenerationChunk(text=delta.text, generation_info=generation_info(delta) or None)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
