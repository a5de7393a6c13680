"""kvflow: an LLM inference and serving engine, drop-in compatible with vLLM's API."""

from kvflow.config import EngineArgs
from kvflow.inputs import PromptType, TextPrompt, TokensPrompt
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import SamplingParams

AsyncEngineArgs = EngineArgs
"""vLLM's name for the async engine's options: the same options here."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in the engine (and torch); import it lazily so `import kvflow` stays cheap.
    if name == "LLM":
        from kvflow.entrypoints.llm import LLM

        return LLM
    if name == "LLMEngine":
        from kvflow.engine.llm_engine import LLMEngine

        return LLMEngine
    if name in ("AsyncLLM", "AsyncLLMEngine"):  # AsyncLLMEngine: vLLM's name for it
        from kvflow.engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'kvflow' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "AsyncLLM", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs",
           "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "TextPrompt",
           "TokensPrompt", "PromptType", "__version__"]
