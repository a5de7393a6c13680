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

Why ``execute_model_async``: nothing between building the batch and launching
the sampler waits for the GPU (inputs go up from pinned memory without a
sync), so the engine can schedule and prepare step N+1 while step N runs. The
runner keeps the tokens it samples itself: a sampled token is a placeholder in
its request's state until the step's ``StepResult`` is read, and a step that
needs it as input before then takes it from the previous step's sampled ids on
the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kvflow.attention.metadata import AttentionMetadata, longest_first
from kvflow.core.scheduler import ModelRunnerOutput, SchedulerOutput
from kvflow.layers.sampler import (Sampler, SamplerOutput, SamplingRow, needs_output_values,
                                   to_device, top_logprobs)
from kvflow.models.base import CausalLM
from kvflow.sampling_params import SamplingParams
from kvflow.worker.cuda_graphs import CUDAGraphRunner, pad_inputs

PENDING = -1
"""Stands in ``RequestState.token_ids`` for a token sampled by a step not read back yet."""


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


class StepResult:
    """One launched step's outputs; ``result()`` waits for that step's GPU work only."""

    def __init__(self, sampled: list[tuple[RequestState, int]], out: Optional[SamplerOutput],
                 prompt_logprobs: dict[str, object], device: torch.device) -> None:
        self._sampled = sampled
        self._host = None if out is None else out.to_host()
        self._prompt_logprobs = prompt_logprobs
        self._event: Optional[torch.cuda.Event] = None
        if device.type == "cuda" and out is not None:
            self._event = torch.cuda.Event()
            self._event.record()
        self._output: Optional[ModelRunnerOutput] = None

    @classmethod
    def empty(cls) -> "StepResult":
        return cls([], None, {}, torch.device("cpu"))

    def result(self) -> ModelRunnerOutput:
        """Waits for the step, writes its tokens into the requests' states, returns them."""
        if self._output is None:
            sampled: dict[str, int] = {}
            logprobs: dict[str, object] = {}
            if self._host is not None:
                if self._event is not None:
                    self._event.synchronize()
                tokens, lps = self._host.to_lists()
                for (state, pos), token, lp in zip(self._sampled, tokens, lps):
                    state.token_ids[pos] = token
                    sampled[state.req_id] = token
                    if lp is not None:
                        logprobs[state.req_id] = lp
            self._output = ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs,
                                             prompt_logprobs=self._prompt_logprobs)
        return self._output


@dataclass
class _Batch:
    """A step's flat batch on the host, and where its rows go after the forward."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start: list[int]
    seq_lens: list[int]
    tables: list[list[int]]
    sample_rows: list[int]
    sample_reqs: list[RequestState]
    prompt_lp: list[tuple[RequestState, int, int]]  # (state, first row, count)
    fill_rows: list[int]
    """Rows whose input is a token the previous step is still sampling ..."""
    fill_from: list[int]
    """... and its index in that step's sampled ids."""


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
        self._last: StepResult = StepResult.empty()
        self._last_sampled: Optional[torch.Tensor] = None
        """The last step's sampled ids, still on the device, and each request's index in it."""
        self._last_index: dict[str, int] = {}
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
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ batch
    def _build(self, sched: SchedulerOutput) -> _Batch:
        bs = self.block_size
        b = _Batch([], [], [], [0], [], [], [], [], [], [], [])
        for req_id, num in sched.num_scheduled_tokens.items():
            state = self.requests[req_id]
            start = state.num_computed_tokens
            end = start + num
            row0 = b.query_start[-1]
            tokens = state.token_ids[start:end]
            if tokens[-1] == PENDING:
                # Only a request's last token can be pending: the step before sampled it.
                tokens[-1] = 0
                b.fill_rows.append(row0 + num - 1)
                b.fill_from.append(self._last_index[req_id])
            b.input_ids.extend(tokens)
            b.positions.extend(range(start, end))
            table = state.block_ids
            if num == 1:
                b.slots.append(table[start // bs] * bs + start % bs)
            else:
                b.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            b.seq_lens.append(end)
            b.tables.append(table)
            b.query_start.append(row0 + num)
            if state.params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
                # Logits at prompt position p give the logprob of prompt token p + 1.
                last = min(end, state.num_prompt_tokens - 1)
                b.prompt_lp.append((state, row0, last - start))
            if end >= len(state.token_ids):
                b.sample_rows.append(row0 + num - 1)
                b.sample_reqs.append(state)
        return b

    def _forward(self, b: _Batch) -> torch.Tensor:
        """Runs the model on the batch (replaying a CUDA graph where one holds it);
        returns hidden states, one row per token."""
        dev = self.device
        fill = None
        if b.fill_rows:
            assert self._last_sampled is not None, "a pending token without a previous step"
            rows = to_device(b.fill_rows + b.fill_from, torch.long, dev).view(2, -1)
            fill = (rows[0], self._last_sampled.index_select(0, rows[1]))
        max_query_len = max(b - a for a, b in zip(b.query_start, b.query_start[1:]))
        graphs = self.graph_runner
        key = None if graphs is None else graphs.choose(len(b.input_ids), len(b.seq_lens),
                                                         max_query_len)
        if key is not None:
            inputs = pad_inputs(key, b.input_ids, b.positions, b.slots, b.query_start,
                                b.seq_lens, b.tables, pin=dev.type == "cuda")
            return graphs.run(key, inputs, fill)[: len(b.input_ids)]
        width = max(len(t) for t in b.tables)
        block_tables = [t + [0] * (width - len(t)) for t in b.tables]
        metadata = AttentionMetadata(
            num_tokens=len(b.input_ids),
            max_query_len=max_query_len,
            max_seq_len=max(b.seq_lens),
            query_start_loc=to_device(b.query_start, torch.int32, dev),
            seq_lens=to_device(b.seq_lens, torch.int32, dev),
            block_tables=to_device(block_tables, torch.int32, dev),
            slot_mapping=to_device(b.slots, torch.long, dev),
            query_start_loc_cpu=b.query_start,
            seq_lens_cpu=b.seq_lens,
            decode_order=(to_device(longest_first(b.seq_lens), torch.int32, dev)
                          if max_query_len == 1 and dev.type == "cuda" else None),
        )
        ids = to_device(b.input_ids, torch.long, dev)
        if fill is not None:
            ids.index_copy_(0, fill[0], fill[1])
        pos = to_device(b.positions, torch.long, dev)
        return self.model(ids, pos, self.kv_caches, metadata)

    # ------------------------------------------------------------------ warm-up
    @torch.inference_mode()
    def warm_up_sampling(self, max_rows: int) -> list[int]:
        """Runs a step's eager tail (the LM head on the sampled rows, then the sampler) at
        start-up, once per kernel choice it makes by row count; returns the row counts run.

        Why: the tail runs outside the CUDA graphs, and the first call of a Triton kernel
        variant compiles it (or reads it from the disk cache) while the first call of a
        CUDA kernel loads its module (lazy loading). Met by a serving step, such a first
        call stalled it by 50-470 ms on the H100 (S1 step trace, benchmarks/RESULTS.md),
        and every running request's TPOT paid for it. The rows mix greedy and random
        sampling with top-k/p, min-p, a penalty and logprobs, so the sampler's kernels
        load too. Row counts: 1..9 (the Triton GEMV's token range and cuBLAS past it),
        then powers of two up to ``max_rows``.
        """
        head = getattr(self.model, "lm_head", None)
        if head is None:
            return []
        hidden_size = head.weight.shape[-1]
        greedy = SamplingRow(SamplingParams(temperature=0.0, max_tokens=1), [], [], None)
        drawn = SamplingRow(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.01,
                                           repetition_penalty=1.1, logprobs=2, max_tokens=1),
                            [1, 2, 3], [4], None)
        counts = sorted({m for m in range(1, 10) if m <= max_rows}
                        | {1 << i for i in range(4, max_rows.bit_length()) if 1 << i <= max_rows}
                        | {max_rows})
        for m in counts:
            hidden = torch.zeros(m, hidden_size, dtype=head.weight.dtype, device=self.device)
            logits = self.model.compute_logits(hidden)
            self.sampler(logits, [greedy if i % 2 else drawn for i in range(m)])
            self.sampler(logits, [greedy] * m)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return counts

    EAGER_WARM_UP_QUERY_LENS = (2, 4, 8, 16, 32, 64, 128)
    """Query lengths of the eager warm-up: one per power-of-two bucket the attention tiles
    are picked by (``kvflow.kernels.paged_attention.choose_config``; from 128 on, one tile)."""

    @torch.inference_mode()
    def warm_up_eager(self) -> list[int]:
        """Runs one small eager forward per attention tile choice of a prefill-carrying
        step; returns the query lengths run.

        Why: steps too large for a CUDA graph (over 512 tokens: a whole prompt beside
        the decodes) run eagerly, and their first call of a new tile variant compiles or
        loads it mid-serving. Run-time ints are not specialised (see the kernels), so
        the variants are the tile choices, a few per model; these forwards of two
        requests each meet all of them. Nothing is written to the cache (slot -1).
        """
        lens = []
        for q in self.EAGER_WARM_UP_QUERY_LENS:
            num_blocks = -(-q // self.block_size)
            qsl, seq_lens = [0, q, 2 * q], [q, q]
            md = AttentionMetadata(
                num_tokens=2 * q, max_query_len=q, max_seq_len=q,
                query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=self.device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
                block_tables=torch.zeros(2, num_blocks, dtype=torch.int32, device=self.device),
                slot_mapping=torch.full((2 * q,), -1, dtype=torch.long, device=self.device),
                query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
            positions = torch.arange(q, device=self.device).repeat(2)
            self.model(torch.ones(2 * q, dtype=torch.long, device=self.device), positions,
                       self.kv_caches, md)
            lens.append(q)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return lens

    # ------------------------------------------------------------------ step
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(sched).result()

    @torch.inference_mode()
    def execute_model_async(self, sched: SchedulerOutput) -> StepResult:
        """Launches the step; the returned handle's ``result()`` waits for it."""
        self._update_states(sched)
        if sched.total_num_scheduled_tokens == 0:
            return StepResult.empty()
        if any(needs_output_values(self.requests[r].params) for r in sched.num_scheduled_tokens):
            # Penalties read earlier outputs' values: have the last step's tokens first.
            self._last.result()
        b = self._build(sched)
        hidden = self._forward(b)

        prompt_logprobs = {}
        for state, row0, count in b.prompt_lp:
            logits = self.model.compute_logits(hidden[row0:row0 + count]).float()
            start = state.num_computed_tokens
            targets = to_device(state.token_ids[start + 1:start + 1 + count], torch.long,
                                self.device)
            prompt_logprobs[state.req_id] = top_logprobs(
                torch.log_softmax(logits, dim=-1), targets, state.params.prompt_logprobs or 0)

        out = None
        sampled: list[tuple[RequestState, int]] = []
        if b.sample_rows:
            logits = self.model.compute_logits(
                hidden[to_device(b.sample_rows, torch.long, self.device)])
            out = self.sampler(logits, [_sampling_row(s) for s in b.sample_reqs])
            for state in b.sample_reqs:
                sampled.append((state, len(state.token_ids)))
                state.token_ids.append(PENDING)
        self._last_sampled = None if out is None else out.token_ids
        self._last_index = {s.req_id: i for i, s in enumerate(b.sample_reqs)}
        self._last = StepResult(sampled, out, prompt_logprobs, self.device)
        return self._last


def _sampling_row(state: RequestState) -> SamplingRow:
    """The row's token lists are copied only for the parameters that read them."""
    p = state.params
    n = state.num_prompt_tokens
    values = needs_output_values(p)
    prompt = state.token_ids[:n] if values else []
    output = state.token_ids[n:] if values or p.min_tokens else []
    return SamplingRow(p, prompt, output, state.generator)
