"""Turns the core's new tokens into RequestOutputs: text, stop strings, logprobs, n > 1.

A user request with ``n`` samples is ``n`` core requests (``"{i}_{id}"`` for
i > 0, the id itself for i = 0); this module gathers them back into one
RequestOutput whose ``outputs`` are ordered by index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from kvflow.core.scheduler import EngineCoreOutput
from kvflow.engine.detokenizer import IncrementalDetokenizer
from kvflow.layers.sampler import TokenLogprobs
from kvflow.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvflow.sampling_params import RequestOutputKind, SamplingParams


def child_request_id(request_id: str, index: int) -> str:
    return request_id if index == 0 else f"{index}_{request_id}"


@dataclass
class SequenceState:
    index: int
    detok: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    sent_text: int = 0
    sent_tokens: int = 0
    changed: bool = False


@dataclass
class ParentState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: RequestOutputKind
    seqs: list[SequenceState]
    metrics: RequestMetrics
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    prompt_logprobs_sent: int = 0
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    """Holds the per-request text state between steps."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[ParentState, SequenceState]] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, kind: RequestOutputKind,
                    arrival_time: float) -> list[str]:
        """Registers a request; returns the core request ids of its ``n`` sequences."""
        seqs = []
        for i in range(params.n):
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop=list(params.stop or []),
                    include_stop_str_in_output=params.include_stop_str_in_output)
            seqs.append(SequenceState(
                index=i, detok=detok,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None))
        parent = ParentState(request_id, prompt, list(prompt_token_ids), params, kind, seqs,
                             RequestMetrics(arrival_time=arrival_time))
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.parents[request_id] = parent
        ids = []
        for seq in seqs:
            cid = child_request_id(request_id, seq.index)
            self.child_to_parent[cid] = (parent, seq)
            ids.append(cid)
        return ids

    def has_request(self, request_id: str) -> bool:
        return request_id in self.parents

    def num_unfinished(self) -> int:
        return len(self.parents)

    # ------------------------------------------------------------------ steps
    def mark_scheduled(self, core_ids: list[str], now: float) -> None:
        """Stamps ``first_scheduled_time`` of the requests these core ids belong to (the
        end of their queue time), once."""
        for cid in core_ids:
            entry = self.child_to_parent.get(cid)
            if entry is not None and entry[0].metrics.first_scheduled_time is None:
                entry[0].metrics.first_scheduled_time = now

    def _to_logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        def text(t: int) -> Optional[str]:
            return self.tokenizer.decode([t]) if self.tokenizer is not None else None

        d = {tid: Logprob(val, rank=r + 1, decoded_token=text(tid))
             for r, (tid, val) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        if lp.token_id not in d:
            d = {lp.token_id: Logprob(lp.logprob, rank=lp.rank, decoded_token=text(lp.token_id)), **d}
        return d

    def process_outputs(self, outputs: list[EngineCoreOutput]
                        ) -> tuple[list[RequestOutput], list[str]]:
        """Applies a step's tokens. Returns the outputs to emit and the core ids to abort
        (sequences a stop string ended, which the scheduler does not know of yet)."""
        now = time.monotonic()
        touched: dict[str, ParentState] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self.child_to_parent.get(out.req_id)
            if entry is None:
                continue
            parent, seq = entry
            touched[parent.request_id] = parent
            parent.num_cached_tokens = out.num_cached_tokens
            if out.new_prompt_logprobs is not None and parent.prompt_logprobs is not None \
                    and seq.index == 0:
                parent.prompt_logprobs.extend(self._to_logprob_dict(lp)
                                              for lp in out.new_prompt_logprobs)  # type: ignore
            if not out.new_token_ids:
                continue
            m = parent.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            m.token_times.append(now)
            seq.token_ids.extend(out.new_token_ids)
            seq.changed = True
            if out.new_logprobs is not None and seq.logprobs is not None:
                lp: TokenLogprobs = out.new_logprobs  # type: ignore[assignment]
                seq.logprobs.append(self._to_logprob_dict(lp))
                seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + lp.logprob
            stop_str = seq.detok.update(out.new_token_ids) if seq.detok is not None else None
            if stop_str is not None and out.finish_reason is None:
                seq.finish_reason, seq.stop_reason = "stop", stop_str
                to_abort.append(out.req_id)
            elif out.finish_reason is not None:
                seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
                if stop_str is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop_str
                elif seq.detok is not None:
                    seq.detok.flush()
        results = []
        for parent in touched.values():
            result = self._make_output(parent, now)
            if result is not None:
                results.append(result)
        return results, to_abort

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Marks every unfinished sequence of the request aborted; returns the final output."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for seq in parent.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                seq.changed = True
        return self._make_output(parent, time.monotonic(), force=True)

    def _make_output(self, parent: ParentState, now: float,
                     force: bool = False) -> Optional[RequestOutput]:
        finished = parent.finished
        if finished:
            parent.metrics.finished_time = now
            self.parents.pop(parent.request_id, None)
            for seq in parent.seqs:
                self.child_to_parent.pop(child_request_id(parent.request_id, seq.index), None)
        kind = parent.kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished and not force:
            return None
        completions = []
        for seq in parent.seqs:
            if kind == RequestOutputKind.DELTA and not seq.changed and not finished:
                continue
            completions.append(self._completion(seq, delta=kind == RequestOutputKind.DELTA))
            seq.changed = False
        prompt_lp = parent.prompt_logprobs
        if kind == RequestOutputKind.DELTA and prompt_lp is not None:
            prompt_lp = prompt_lp[parent.prompt_logprobs_sent:]
            parent.prompt_logprobs_sent = len(parent.prompt_logprobs or [])
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids, prompt_logprobs=prompt_lp,
            outputs=completions, finished=finished,
            num_cached_tokens=parent.num_cached_tokens, metrics=parent.metrics)

    @staticmethod
    def _completion(seq: SequenceState, delta: bool) -> CompletionOutput:
        done = seq.finish_reason is not None
        text = seq.detok.text if seq.detok is not None else ""
        upto = seq.detok.streamable_len(done) if seq.detok is not None else 0
        if delta:
            out_text = text[seq.sent_text:upto] if upto > seq.sent_text else ""
            tokens = seq.token_ids[seq.sent_tokens:]
            logprobs = seq.logprobs[seq.sent_tokens:] if seq.logprobs is not None else None
            seq.sent_text = max(seq.sent_text, upto)
            seq.sent_tokens = len(seq.token_ids)
        else:
            out_text, tokens, logprobs = text[:upto], list(seq.token_ids), seq.logprobs
        return CompletionOutput(index=seq.index, text=out_text, token_ids=tokens,
                                cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
