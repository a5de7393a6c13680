"""POST /v1/completions: prompts in, text (streamed or whole) out, in OpenAI's format.

A request with P prompts and ``n`` samples answers with P*n choices; choice
``i*n + j`` is sample j of prompt i, as OpenAI numbers them. Each prompt is one
engine request (the engine fans out its n samples). With vLLM's ``use_beam_search``
the ``n`` choices of a prompt are its best beams instead (``kvflow.beam_search``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncGenerator, AsyncIterator, Optional, Union

from fastapi import Request
from fastapi.responses import Response

from kvflow.beam_search import beam_search_async
from kvflow.engine.output_processor import RequestOutputKind
from kvflow.entrypoints.openai.errors import APIError, from_value_error
from kvflow.entrypoints.openai.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    UsageInfo,
)
from kvflow.entrypoints.openai.serving_base import (
    ClientDisconnected,
    EnginePrompt,
    OpenAIServing,
    clamp_logprob,
    run_until_disconnect,
)
from kvflow.entrypoints.openai.sse import SSEResponse, stream_events
from kvflow.entrypoints.openai.stream_chunks import ChunkWriter, completion_choice, usage_dict
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import BeamSearchParams
from kvflow.tokenizer import eos_token_ids

_FIELDS = frozenset(CompletionRequest.model_fields)


class OpenAIServingCompletion(OpenAIServing):

    async def create_completion(self, request: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = self.resolve_model(request.model)
        self.log_ignored_fields(request)
        self.check_common(request)
        if request.suffix:
            raise APIError("suffix is not supported by kvflow.", 400, "suffix")
        request_id = self.new_request_id("cmpl")
        prompts = self._engine_prompts(request, request_id)
        if (request.model_extra or {}).get("use_beam_search"):
            try:
                return await run_until_disconnect(
                    raw, self._beam_search(request, prompts, model, request_id))
            except ClientDisconnected:
                return Response(status_code=499)
        if request.stream:
            return await self._stream(request, raw, prompts, model, request_id, arrival)
        try:
            return await run_until_disconnect(
                raw, self._full(request, prompts, model, request_id, arrival))
        except ClientDisconnected:
            return Response(status_code=499)

    # ------------------------------------------------------------------ prompts
    def _engine_prompts(self, request: CompletionRequest, request_id: str) -> list[EnginePrompt]:
        raw_prompts = _split_prompts(request.prompt)
        out = []
        for i, item in enumerate(raw_prompts):
            if isinstance(item, str):
                text: Optional[str] = item
                ids = self.require_tokenizer().encode(
                    item, add_special_tokens=request.add_special_tokens)
            else:
                text, ids = None, list(item)
                self.check_token_ids(ids, "prompt")
            if request.truncate_prompt_tokens is not None:
                ids = ids[-request.truncate_prompt_tokens:]
            if not ids:
                raise APIError("The prompt is empty: it must hold at least one token.", 400,
                               "prompt")
            max_tokens = self.resolve_max_tokens(len(ids), request.max_tokens, "prompt")
            echo_logprobs = request.logprobs if request.echo else None
            prompt_logprobs = request.prompt_logprobs
            if echo_logprobs is not None:
                prompt_logprobs = max(prompt_logprobs or 0, echo_logprobs)
            params = self.sampling_params(request, max_tokens=max_tokens,
                                          logprobs=request.logprobs,
                                          prompt_logprobs=prompt_logprobs, field_names=_FIELDS)
            rid = request_id if len(raw_prompts) == 1 else f"{request_id}-{i}"
            out.append(EnginePrompt(rid, ids, text, params))
        return out

    def _prompt_text(self, prompt: EnginePrompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids) if self.tokenizer is not None else ""

    # ------------------------------------------------------------------ beam search
    async def _beam_search(self, request: CompletionRequest, prompts: list[EnginePrompt],
                           model: str, request_id: str) -> Response:
        """vLLM's ``use_beam_search``: the ``n`` best beams of each prompt as its choices,
        best first (``kvflow.beam_search``; ``length_penalty`` is a body field too)."""
        for name, value in (("stream", request.stream), ("logprobs", request.logprobs),
                            ("echo", request.echo)):
            if value:
                raise APIError(f"{name} is not available with use_beam_search.", 400, name)
        extra = request.model_extra or {}
        try:
            length_penalty = float(extra.get("length_penalty", 1.0))
        except (TypeError, ValueError):
            raise APIError(f"length_penalty must be a number, got {extra['length_penalty']!r}.",
                           400, "length_penalty") from None
        width = request.n or 1
        eos_ids = set(eos_token_ids(self.tokenizer, self.async_llm.model_config.model,
                                    self.async_llm.model_config.hf_config))
        try:
            searches = [beam_search_async(
                self.async_llm, prompt.token_ids,
                BeamSearchParams(beam_width=width, max_tokens=prompt.params.max_tokens,
                                 ignore_eos=bool(request.ignore_eos),
                                 temperature=request.temperature or 0.0,
                                 length_penalty=length_penalty,
                                 include_stop_str_in_output=bool(
                                     request.include_stop_str_in_output)),
                eos_ids, prompt.request_id) for prompt in prompts]
            outputs = await asyncio.gather(*searches)
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS) from None
        choices = []
        num_generated = 0
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            for j, seq in enumerate(out.sequences):
                num_generated += len(seq.tokens) - len(prompt.token_ids)
                choices.append(CompletionResponseChoice(
                    index=i * width + j, text=seq.text or "", finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason))
        return _response(request_id, model, choices, prompts, num_generated)

    # ------------------------------------------------------------------ whole response
    async def _full(self, request: CompletionRequest, prompts: list[EnginePrompt], model: str,
                    request_id: str, arrival: float) -> Response:
        finals: dict[int, RequestOutput] = {}
        try:
            async for index, out in self.run_requests(prompts, RequestOutputKind.FINAL_ONLY,
                                                      arrival):
                if out.finished:
                    finals[index] = out
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS) from None
        choices = []
        num_generated = 0
        for index, prompt in enumerate(prompts):
            final = finals[index]
            for comp in sorted(final.outputs, key=lambda c: c.index):
                num_generated += len(comp.token_ids)
                text = comp.text
                logprobs = None
                if request.echo:
                    text = self._prompt_text(prompt) + text
                if request.logprobs is not None:
                    logprobs = self._logprobs(request, prompt, final, comp, echo=bool(request.echo))
                choice = CompletionResponseChoice(
                    index=index * request.n + comp.index, text=text, logprobs=logprobs,
                    finish_reason=comp.finish_reason, stop_reason=comp.stop_reason)
                if request.return_token_ids:
                    choice.prompt_token_ids = prompt.token_ids
                    choice.token_ids = list(comp.token_ids)
                if request.prompt_logprobs is not None:
                    choice.prompt_logprobs = self.prompt_logprobs(final.prompt_logprobs,
                                                                  len(prompt.token_ids))
                choices.append(choice)
        return _response(request_id, model, choices, prompts, num_generated)

    def _logprobs(self, request: CompletionRequest, prompt: EnginePrompt,
                  out: RequestOutput, comp: CompletionOutput, *, echo: bool,
                  offset: int = 0) -> dict[str, Any]:
        """OpenAI's parallel lists for the choice's tokens (the prompt's first when echoing)."""
        token_ids: list[int] = []
        entries: list[Optional[dict[int, Logprob]]] = []
        if echo:
            prompt_lps = list(out.prompt_logprobs or [])
            prompt_lps += [None] * (len(prompt.token_ids) - len(prompt_lps))
            token_ids += prompt.token_ids
            entries += prompt_lps[:len(prompt.token_ids)]
        token_ids += comp.token_ids
        entries += list(comp.logprobs or [])
        return self.completion_logprobs(token_ids, entries, self.tokens_as_ids(request),
                                        offset)

    def completion_logprobs(self, token_ids: list[int],
                            entries: list[Optional[dict[int, Logprob]]], as_ids: bool,
                            offset: int) -> dict[str, Any]:
        """``CompletionLogProbs`` as a dict (the stream writes it without pydantic)."""
        tokens: list[str] = []
        text_offset: list[int] = []
        token_logprobs: list[Optional[float]] = []
        top_logprobs: list[Optional[dict[str, float]]] = []
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry else None
            token = self.token_text(token_id, chosen, as_ids)
            tokens.append(token)
            text_offset.append(offset)
            offset += len(token)
            if entry is None:  # the first prompt token has no logprob
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(clamp_logprob(chosen.logprob) if chosen is not None else None)
            top_logprobs.append({
                self.token_text(tid, lp, as_ids): clamp_logprob(lp.logprob)
                for tid, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)})
        return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top_logprobs}

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request: CompletionRequest, raw: Request,
                      prompts: list[EnginePrompt], model: str, request_id: str,
                      arrival: float) -> Response:
        outputs = self.run_requests(prompts, RequestOutputKind.DELTA, arrival)
        try:
            first = await run_until_disconnect(raw, outputs.__anext__())
        except ValueError as exc:
            raise from_value_error(exc, _FIELDS) from None
        except ClientDisconnected:
            await outputs.aclose()
            return Response(status_code=499)
        return SSEResponse(self._stream_body(request, prompts, model, request_id, first, outputs))

    async def _stream_body(self, request: CompletionRequest, prompts: list[EnginePrompt],
                           model: str, request_id: str, first: tuple[int, RequestOutput],
                           outputs: AsyncGenerator[tuple[int, RequestOutput], None]
                           ) -> AsyncIterator[str]:
        created = int(time.time())
        n = request.n
        opts = request.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(include_usage and opts and opts.continuous_usage_stats)
        num_prompt = sum(len(p.token_ids) for p in prompts)
        num_generated = 0
        echoed: set[int] = set()
        ended: set[int] = set()
        ids_sent: set[int] = set()
        offsets: dict[int, int] = {}
        # DELTA outputs carry prompt logprobs in slices, as prefill chunks compute them.
        prompt_lps: dict[int, list[Any]] = {}
        as_ids = self.tokens_as_ids(request)
        writer = ChunkWriter(request_id, "text_completion", created, model)

        def chunks(index: int, out: RequestOutput) -> list[str]:
            nonlocal num_generated
            prompt = prompts[index]
            events = []
            if out.prompt_logprobs:
                prompt_lps.setdefault(index, []).extend(out.prompt_logprobs)
            for comp in out.outputs:
                choice_index = index * n + comp.index
                # The request's last output repeats samples that ended earlier (empty deltas).
                if choice_index in ended:
                    continue
                if comp.finish_reason is not None:
                    ended.add(choice_index)
                num_generated += len(comp.token_ids)
                text = comp.text
                token_ids = list(comp.token_ids)
                entries: list[Any] = list(comp.logprobs or [])
                if request.echo and choice_index not in echoed:
                    echoed.add(choice_index)
                    text = self._prompt_text(prompt) + text
                    if request.logprobs is not None:
                        lps = list(prompt_lps.get(index, []))
                        lps += [None] * (len(prompt.token_ids) - len(lps))
                        token_ids = prompt.token_ids + token_ids
                        entries = lps[:len(prompt.token_ids)] + entries
                # Tokens whose text is held back (half a character, a possible stop
                # string) make no chunk unless their ids or logprobs were asked for, or
                # there is no tokenizer and ids are all there is.
                wants_tokens = (request.logprobs is not None or request.return_token_ids
                                or self.tokenizer is None)
                if not text and comp.finish_reason is None and not (wants_tokens and token_ids):
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self.completion_logprobs(token_ids, entries, as_ids,
                                                        offsets.get(choice_index, 0))
                    if logprobs["text_offset"]:
                        offsets[choice_index] = (logprobs["text_offset"][-1]
                                                 + len(logprobs["tokens"][-1]))
                prompt_ids = ids = None
                if request.return_token_ids:
                    ids = list(comp.token_ids)
                    if choice_index not in ids_sent:
                        ids_sent.add(choice_index)
                        prompt_ids = prompt.token_ids
                choice = completion_choice(choice_index, text, logprobs, comp.finish_reason,
                                           comp.stop_reason, prompt_ids, ids)
                events.append(writer.event(
                    choice, usage_dict(num_prompt, num_generated) if continuous else None))
            return events

        def closing() -> Optional[str]:  # the usage chunk, counted once the stream ended
            if not include_usage:
                return None
            return writer.event(None, usage_dict(num_prompt, num_generated))

        async for event in stream_events((), first, outputs, chunks, closing):
            yield event


def _split_prompts(prompt: Union[str, list[Any]]) -> list[Union[str, list[int]]]:
    """OpenAI's four prompt shapes as a list of single prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt is empty: give a string, a list of strings, a list of token ids "
                       "or a list of such lists.", 400, "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _response(request_id: str, model: str, choices: list[CompletionResponseChoice],
              prompts: list[EnginePrompt], num_generated: int) -> Response:
    """The whole (non-streamed) completion response with its usage."""
    num_prompt = sum(len(p.token_ids) for p in prompts)
    response = CompletionResponse(
        id=request_id, model=model, choices=choices,
        usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                        total_tokens=num_prompt + num_generated))
    return Response(response.model_dump_json(), media_type="application/json")
