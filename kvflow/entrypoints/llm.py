"""The offline entry point: ``LLM(model=...).generate(...)`` / ``.chat(...)``, as in vLLM."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from kvflow.config import EngineArgs
from kvflow.entrypoints import chat_content
from kvflow.engine.llm_engine import LLMEngine, PromptType
from kvflow.engine.output_processor import RequestOutputKind
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import BeamSearchParams, SamplingParams
from kvflow.vllm_compat import refuse_per_call_options

if TYPE_CHECKING:
    from kvflow.beam_search import BeamSearchOutput


class LLM:
    """Generates text for batches of prompts with continuous batching.

    Takes the engine options of ``EngineArgs`` (vLLM's names) as keyword
    arguments; an unknown name is a ValueError listing the known ones.
    """

    def __init__(self, model: str = "", **kwargs: Any) -> None:
        if not model:
            from kvflow.models.gguf import default_model_path

            model = default_model_path()
        args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(args)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    def start_profile(self) -> None:
        """torch.profiler on in every worker until ``stop_profile()``, which writes one
        trace per rank to $KVFLOW_TORCH_PROFILER_DIR (RuntimeError while it is unset)."""
        self.llm_engine.start_profile()

    def stop_profile(self) -> None:
        self.llm_engine.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prompt block (benchmarks: each run computes its prompts);
        False, changing nothing, while a request holds blocks."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults, overridden by the model's generation_config.json sampling settings
        (``generation_config="auto"``, the default; see ``kvflow.generation_defaults``)."""
        return SamplingParams(**self.llm_engine.config.model_config.sampling_defaults)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType], None] = None,
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        lora_request: Any = None,
        *,
        prompt_token_ids: Optional[list[list[int]]] = None,
        prompt_adapter_request: Any = None,
        guided_options_request: Any = None,
        priority: Optional[list[int]] = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; returns outputs in input order.

        ``use_tqdm``: a progress bar, or (as in vLLM) the tqdm-like class to draw it with.
        vLLM's ``lora_request``, ``prompt_adapter_request`` and ``guided_options_request``
        are accepted as None, and ``priority`` as None or all zeros (first come, first
        served); anything else is a ValueError saying what kvflow lacks.
        """
        refuse_per_call_options(lora_request=lora_request,
                                prompt_adapter_request=prompt_adapter_request,
                                guided_options_request=guided_options_request)
        items = self._normalize_prompts(prompts, prompt_token_ids)
        if priority is not None and (len(priority) != len(items) or any(priority)):
            raise ValueError(f"priority={priority!r}: kvflow schedules first come, first served "
                             f"(scheduling_policy='fcfs'); pass None or {len(items)} zeros.")
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(items)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"{len(params_list)} SamplingParams were given for "
                                 f"{len(items)} prompts; pass one, or one per prompt.")
        ids = []
        try:
            for item, params in zip(items, params_list):
                rid = str(next(self._counter))
                self.llm_engine.add_request(rid, item, params,
                                            output_kind=RequestOutputKind.FINAL_ONLY)
                ids.append(rid)
        except Exception:
            self.llm_engine.abort_request(ids)  # queue all or nothing
            raise
        return self._run_engine(ids, use_tqdm)

    @staticmethod
    def _normalize_prompts(prompts: Any, prompt_token_ids: Optional[list[list[int]]]
                           ) -> list[PromptType]:
        if prompt_token_ids is not None:
            return [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("generate() needs prompts (or prompt_token_ids).")
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            return [{"prompt_token_ids": list(prompts)}]
        return list(prompts)

    def _run_engine(self, request_ids: list[str],
                    use_tqdm: Union[bool, Callable[..., Any]]) -> list[RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            if callable(use_tqdm):
                make_bar = use_tqdm
            else:
                from tqdm.auto import tqdm as make_bar

            bar = make_bar(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True,
                           postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        wanted = set(request_ids)
        try:
            while engine.has_unfinished_requests() and len(results) < len(wanted):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        if bar is not None:
                            in_tokens += len(out.prompt_token_ids)
                            out_tokens += sum(len(c.token_ids) for c in out.outputs)
                            elapsed = time.perf_counter() - start
                            bar.postfix = (f"est. speed input: {in_tokens / elapsed:.2f} toks/s, "
                                           f"output: {out_tokens / elapsed:.2f} toks/s")
                            bar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in request_ids if r in results]

    # ------------------------------------------------------------------ beam search
    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams,
                    lora_request: Any = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search (``kvflow.beam_search``): the best ``params.beam_width``
        beams of each prompt, best first."""
        refuse_per_call_options(lora_request=lora_request)
        if isinstance(prompts, (str, dict)):
            raise ValueError("beam_search takes a list of prompts (str, TextPrompt or "
                             "TokensPrompt), as vLLM's does.")
        from kvflow.beam_search import beam_search

        return beam_search(self, list(prompts), params, use_tqdm)

    # ------------------------------------------------------------------ chat
    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        lora_request: Any = None,
        chat_template: Optional[str] = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Optional[list[dict[str, Any]]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to one conversation or a list, then generates.

        Arguments in vLLM's order. ``tools`` (JSON schemas of functions) reach the template
        as its ``tools`` variable, as in transformers and vLLM; parsing tool calls out of
        the reply is the caller's. ``chat_template_content_format``: how a message's list
        of content parts reaches the template (``kvflow.entrypoints.chat_content``).
        """
        refuse_per_call_options(lora_request=lora_request,
                                mm_processor_kwargs=mm_processor_kwargs)
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        extra = dict(chat_template_kwargs or {})
        if tools is not None:
            extra["tools"] = tools
        tokenizer = self.get_tokenizer()
        content_format = chat_content.resolve_format(
            chat_template_content_format,
            chat_template or getattr(tokenizer, "chat_template", None))
        prompts = [{"prompt_token_ids": apply_chat_template(
                        tokenizer, conv, chat_template=chat_template,
                        add_generation_prompt=add_generation_prompt,
                        continue_final_message=continue_final_message,
                        content_format=content_format, **extra)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def apply_chat_template(tokenizer: Any, conversation: list[dict], *,
                        chat_template: Optional[str] = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False, content_format: str = "string",
                        **kwargs: Any) -> list[int]:
    """Token ids of a conversation rendered with the model's (or the given) chat template;
    lists of content parts are joined or kept as ``content_format`` says."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer; skip_tokenizer_init=True has none.")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template; pass chat_template=... "
                         "(a Jinja string).")
    messages = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {msg!r}.")
        content = chat_content.template_content(msg.get("content"), content_format,
                                                f"messages[{i}].content")
        messages.append(dict(msg, content=content))
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message, **kwargs)
    # The template already holds the BOS text; don't add it twice.
    return tokenizer.encode(text, add_special_tokens=False)
