"""From logits to tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

Why the exponential race: sampling ``argmax(p / q)`` with ``q ~ Exp(1)`` draws
from ``p`` exactly, needs no host sync (no cumulative sum, no multinomial), and
lets each seeded request draw its noise from its own generator, so its samples
do not depend on what else is in the batch.

Logprobs are those of the raw model distribution (before penalties and
temperature), as vLLM returns them by default.

Nothing here waits for the GPU: per-row parameters travel host-to-device from
pinned memory without blocking, and the outputs stay on the device until the
caller copies them back (``SamplerOutput.to_host``), so the engine can prepare
the next step while this one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kvflow.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a stream sync (pinned staging on CUDA).

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and
    waits for the whole stream, i.e. for every kernel queued before it.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass
class SamplingRow:
    """One row of logits to sample from, with everything its sampling depends on."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: Optional[torch.Generator]


def needs_output_values(params: SamplingParams) -> bool:
    """True if sampling reads the values of earlier output tokens (not just their count)."""
    return (params.repetition_penalty != 1.0 or bool(params.frequency_penalty)
            or bool(params.presence_penalty))


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled (or prompt) position: the chosen token and the top ones."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class LogprobTensors:
    """Per row: chosen id, its logprob and rank (1 = most likely), the top-k ids and logprobs."""

    chosen: torch.Tensor
    chosen_logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    @classmethod
    def compute(cls, logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> "LogprobTensors":
        chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
        ranks = (logprobs > chosen_lp[:, None]).sum(dim=1) + 1
        top_vals, top_ids = logprobs.topk(k, dim=1)
        return cls(chosen, chosen_lp, ranks, top_ids, top_vals)

    def to_host(self) -> "LogprobTensors":
        """Starts the copies back; read the result after the step's event has completed."""
        return LogprobTensors(*(_to_host(t) for t in (
            self.chosen, self.chosen_logprobs, self.ranks, self.top_ids, self.top_logprobs)))

    def to_lists(self, ks: Optional[Sequence[int]] = None) -> list[TokenLogprobs]:
        """Host values; ``ks[i]`` cuts row i's top list (rows may ask for fewer than k)."""
        chosen, lps, ranks = self.chosen.tolist(), self.chosen_logprobs.tolist(), self.ranks.tolist()
        top_ids, top_vals = self.top_ids.tolist(), self.top_logprobs.tolist()
        out = []
        for i in range(len(chosen)):
            n = len(top_ids[i]) if ks is None else ks[i]
            out.append(TokenLogprobs(chosen[i], lps[i], ranks[i], top_ids[i][:n], top_vals[i][:n]))
        return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Per row: the chosen token's logprob and rank and the top-k tokens (waits for the GPU)."""
    return LogprobTensors.compute(logprobs, chosen, k).to_lists()


@dataclass
class SamplerOutput:
    """Sampled ids [N] on the device, and logprob tensors for the rows that asked for them."""

    token_ids: torch.Tensor
    logprob_rows: list[int]
    logprob_ks: list[int]
    logprobs: Optional[LogprobTensors]

    def to_host(self) -> "SamplerOutput":
        """Starts every copy back without waiting (pinned memory on CUDA)."""
        return SamplerOutput(_to_host(self.token_ids), self.logprob_rows, self.logprob_ks,
                             None if self.logprobs is None else self.logprobs.to_host())

    def to_lists(self) -> tuple[list[int], list[Optional[TokenLogprobs]]]:
        """Host values (call on the ``to_host`` copy once its copies have completed)."""
        per_row: list[Optional[TokenLogprobs]] = [None] * self.token_ids.shape[0]
        if self.logprobs is not None:
            for row, lp in zip(self.logprob_rows, self.logprobs.to_lists(self.logprob_ks)):
                per_row[row] = lp
        return self.token_ids.tolist(), per_row


class Sampler:
    """Picks one token per row of logits [N, V] (float32)."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        dev = logits.device
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want else None
        logits = self._apply_constraints(logits.clone(), rows)
        logits = self._apply_penalties(logits, rows)

        greedy = [r.params.temperature < 1e-5 for r in rows]
        token_ids = logits.argmax(dim=-1)
        if not all(greedy):
            sampled = self._sample(logits, rows)
            token_ids = torch.where(to_device(greedy, torch.bool, dev), token_ids, sampled)

        lp = None
        ks = [rows[i].params.logprobs or 0 for i in want]
        if raw_logprobs is not None:
            idx = to_device(want, torch.long, dev)
            lp = LogprobTensors.compute(raw_logprobs[idx], token_ids[idx], max(ks))
        return SamplerOutput(token_ids, want, ks, lp)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _apply_constraints(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        for i, row in enumerate(rows):
            p = row.params
            if p.logit_bias:
                ids = to_device(list(p.logit_bias.keys()), torch.long, logits.device)
                vals = to_device(list(p.logit_bias.values()), logits.dtype, logits.device)
                logits[i].index_add_(0, ids, vals)
            if p.allowed_token_ids:
                mask = torch.full_like(logits[i], _NEG_INF)
                mask[to_device(p.allowed_token_ids, torch.long, logits.device)] = 0
                logits[i] += mask
            if p.min_tokens and len(row.output_token_ids) < p.min_tokens and p.all_stop_token_ids:
                stop_ids = to_device(sorted(p.all_stop_token_ids | p.eos_token_ids), torch.long,
                                     logits.device)
                logits[i, stop_ids] = _NEG_INF
        return logits

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[1]
        for i, row in enumerate(rows):
            p = row.params
            rep = p.repetition_penalty != 1.0
            if not (rep or p.frequency_penalty or p.presence_penalty):
                continue
            out = to_device(row.output_token_ids, torch.long, logits.device)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
            if rep:
                seen = counts > 0
                prompt = to_device(row.prompt_token_ids, torch.long, logits.device)
                seen[prompt[prompt < vocab]] = True
                row_logits = logits[i]
                penalised = torch.where(row_logits > 0, row_logits / p.repetition_penalty,
                                        row_logits * p.repetition_penalty)
                logits[i] = torch.where(seen, penalised, row_logits)
            if p.frequency_penalty:
                logits[i] -= p.frequency_penalty * counts
            if p.presence_penalty:
                logits[i] -= p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        temps = to_device([max(r.params.temperature, 1e-5) for r in rows], torch.float32, device)
        logits = logits / temps[:, None]
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        min_p = [r.params.min_p for r in rows]
        if any(k > 0 for k in top_k):
            k = to_device([k if k > 0 else logits.shape[1] for k in top_k], torch.long, device)
            k = k.clamp(max=logits.shape[1])
            sorted_vals = logits.sort(dim=-1, descending=True).values
            kth = sorted_vals.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, _NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        if any(p > 0 for p in min_p):
            mp = to_device(min_p, torch.float32, device)
            threshold = probs.max(dim=-1, keepdim=True).values * mp[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        if any(p < 1.0 for p in top_p):
            tp = to_device(top_p, torch.float32, device)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
            drop_sorted = before > tp[:, None] * sorted_probs.sum(dim=-1, keepdim=True)
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):
            noise.exponential_()
        elif unseeded:
            noise[to_device(unseeded, torch.long, device)] = torch.empty(
                len(unseeded), probs.shape[1], device=device).exponential_()
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return (probs / noise).argmax(dim=-1)
