"""From logits to tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

Why the exponential race: sampling ``argmax(p / q)`` with ``q ~ Exp(1)`` draws
from ``p`` exactly, needs no host sync (no cumulative sum, no multinomial), and
lets each seeded request draw its noise from its own generator, so its samples
do not depend on what else is in the batch.

Logprobs are those of the raw model distribution (before penalties and
temperature), as vLLM returns them by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvflow.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One row of logits to sample from, with everything its sampling depends on."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: Optional[torch.Generator]


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled (or prompt) position: the chosen token and the top ones."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprobs]]


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Per row: the chosen token's logprob and rank (1 = most likely) and the top-k tokens."""
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    ranks = (logprobs > chosen_lp[:, None]).sum(dim=1) + 1
    if k > 0:
        top_vals, top_ids = logprobs.topk(k, dim=1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    else:
        top_vals = top_ids = [[] for _ in range(logprobs.shape[0])]
    chosen_l, lp_l, rank_l = chosen.tolist(), chosen_lp.tolist(), ranks.tolist()
    return [TokenLogprobs(chosen_l[i], lp_l[i], rank_l[i], top_ids[i], top_vals[i])
            for i in range(logprobs.shape[0])]


class Sampler:
    """Picks one token per row of logits [N, V] (float32)."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_constraints(logits.clone(), rows)
        logits = self._apply_penalties(logits, rows)

        greedy = torch.tensor([r.params.temperature < 1e-5 for r in rows], device=logits.device)
        token_ids = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits, rows)
            token_ids = torch.where(greedy, token_ids, sampled)

        logprobs: list[Optional[TokenLogprobs]] = [None] * len(rows)
        if raw_logprobs is not None:
            want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
            k = max(rows[i].params.logprobs or 0 for i in want)
            idx = torch.tensor(want, device=logits.device)
            results = top_logprobs(raw_logprobs[idx], token_ids[idx], k)
            for i, res in zip(want, results):
                n = rows[i].params.logprobs or 0
                res.top_ids, res.top_logprobs = res.top_ids[:n], res.top_logprobs[:n]
                logprobs[i] = res
        return SamplerOutput(token_ids.tolist(), logprobs)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _apply_constraints(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        for i, row in enumerate(rows):
            p = row.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()), device=logits.device)
                vals = torch.tensor(list(p.logit_bias.values()), device=logits.device)
                logits[i].index_add_(0, ids, vals.to(logits.dtype))
            if p.allowed_token_ids:
                mask = torch.full_like(logits[i], _NEG_INF)
                mask[torch.tensor(p.allowed_token_ids, device=logits.device)] = 0
                logits[i] += mask
            if p.min_tokens and len(row.output_token_ids) < p.min_tokens and p.all_stop_token_ids:
                stop_ids = torch.tensor(sorted(p.all_stop_token_ids | p.eos_token_ids),
                                        device=logits.device)
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
            out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
            if rep:
                seen = counts > 0
                prompt = torch.tensor(row.prompt_token_ids, dtype=torch.long, device=logits.device)
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
        temps = torch.tensor([max(r.params.temperature, 1e-5) for r in rows], device=device)
        logits = logits / temps[:, None]
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        min_p = [r.params.min_p for r in rows]
        if any(k > 0 for k in top_k):
            k = torch.tensor([k if k > 0 else logits.shape[1] for k in top_k], device=device)
            k = k.clamp(max=logits.shape[1])
            sorted_vals = logits.sort(dim=-1, descending=True).values
            kth = sorted_vals.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, _NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        if any(p > 0 for p in min_p):
            mp = torch.tensor(min_p, device=device)
            threshold = probs.max(dim=-1, keepdim=True).values * mp[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        if any(p < 1.0 for p in top_p):
            tp = torch.tensor(top_p, device=device)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
            drop_sorted = before > tp[:, None] * sorted_probs.sum(dim=-1, keepdim=True)
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_()
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return (probs / noise).argmax(dim=-1)
