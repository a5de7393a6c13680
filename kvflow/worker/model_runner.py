"""Turns a SchedulerOutput into one flat forward pass, then samples.

The runner keeps a small state per request (its tokens, block table and
generator), updated from the scheduler's deltas, and for each step builds::

    input_ids     [T]    tokens to compute, request after request
    positions     [T]    their positions in their sequences
    slot_mapping  [T]    block_table[pos // S] * S + pos % S
    query_start_loc [B+1], seq_lens [B], block_tables [B, P]

Logits are computed only for the rows that are sampled (the last token of a
request whose known tokens are all computed) and, for requests asking for
prompt logprobs, for their prompt positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kvflow.attention.metadata import AttentionMetadata
from kvflow.core.scheduler import ModelRunnerOutput, SchedulerOutput
from kvflow.layers.sampler import Sampler, SamplingRow, top_logprobs
from kvflow.models.base import CausalLM
from kvflow.sampling_params import SamplingParams
from kvflow.worker.cuda_graphs import CUDAGraphRunner


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: Optional[torch.Generator] = None
    prompt_logprobs_done: int = field(default=0)


class ModelRunner:
    """Owns the model and the KV cache tensors of one worker."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, seed: int,
                 graph_runner: Optional[CUDAGraphRunner] = None) -> None:
        self.model = model
        self.graph_runner = graph_runner
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.requests: dict[str, RequestState] = {}
        self._paused_generators: dict[str, torch.Generator] = {}
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ state
    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.preempted_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None and state.generator is not None:
                self._paused_generators[req_id] = state.generator
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
            self._paused_generators.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            # A request back from preemption continues its seeded stream where it stopped.
            generator = self._paused_generators.pop(new.req_id, None)
            if generator is None and new.sampling_params.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(new.sampling_params.seed)
            self.requests[new.req_id] = RequestState(
                req_id=new.req_id, token_ids=list(new.all_token_ids),
                num_prompt_tokens=new.num_prompt_tokens, params=new.sampling_params,
                block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens,
                generator=generator)
        for cached in sched.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ batch
    def _prepare(self, sched: SchedulerOutput):
        """Builds the flat batch and runs the forward (replaying a CUDA graph for decodes)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_reqs: list[RequestState] = []
        prompt_lp: list[tuple[RequestState, int, int]] = []  # (state, first row, count)
        for req_id, num in sched.num_scheduled_tokens.items():
            state = self.requests[req_id]
            start = state.num_computed_tokens
            end = start + num
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            table = state.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            tables.append(table)
            row0 = query_start[-1]
            query_start.append(row0 + num)
            if state.params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
                # Logits at prompt position p give the logprob of prompt token p + 1.
                last = min(end, state.num_prompt_tokens - 1)
                prompt_lp.append((state, row0, last - start))
            if end >= len(state.token_ids):
                sample_rows.append(row0 + num - 1)
                sample_reqs.append(state)
        max_query_len = max(b - a for a, b in zip(query_start, query_start[1:]))
        graphs = self.graph_runner
        if graphs is not None and graphs.can_run(len(seq_lens), max_query_len):
            hidden = graphs.run(input_ids, positions, slots, seq_lens, tables)
            return hidden, sample_rows, sample_reqs, prompt_lp
        width = max(len(t) for t in tables)
        block_tables = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        metadata = AttentionMetadata(
            num_tokens=len(input_ids),
            max_query_len=max_query_len,
            max_seq_len=max(seq_lens),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(block_tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        hidden = self.model(ids, pos, self.kv_caches, metadata)
        return hidden, sample_rows, sample_reqs, prompt_lp

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput(sampled_token_ids={})
        hidden, sample_rows, sample_reqs, prompt_lp = self._prepare(sched)

        prompt_logprobs = {}
        for state, row0, count in prompt_lp:
            logits = self.model.compute_logits(hidden[row0:row0 + count]).float()
            start = state.num_computed_tokens
            targets = torch.tensor(state.token_ids[start + 1:start + 1 + count], device=self.device)
            prompt_logprobs[state.req_id] = top_logprobs(
                torch.log_softmax(logits, dim=-1), targets, state.params.prompt_logprobs or 0)

        sampled: dict[str, int] = {}
        logprobs: dict[str, object] = {}
        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            rows = [SamplingRow(s.params, s.token_ids[:s.num_prompt_tokens],
                                s.token_ids[s.num_prompt_tokens:], s.generator)
                    for s in sample_reqs]
            out = self.sampler(logits, rows)
            for state, token, lp in zip(sample_reqs, out.token_ids, out.logprobs):
                sampled[state.req_id] = token
                if lp is not None:
                    logprobs[state.req_id] = lp
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs,
                                 prompt_logprobs=prompt_logprobs)
