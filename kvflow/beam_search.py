"""Beam search over the engine, as vLLM's ``LLM.beam_search`` runs it.

Each round asks the engine for one token of every live beam with the top
``2 * beam_width`` log-probabilities, so the rounds are ordinary batched steps
(the beams of a prompt share its blocks through the prefix cache). A beam
grows by each offered token; a grown beam that ends with EOS is set aside as
complete, and of the others each prompt keeps its ``beam_width`` best by cumulative
log-probability. After ``max_tokens`` rounds (or when no beam is live) the complete
and live beams of a prompt are ranked by::

    score = cum_logprob / len(prompt + beam) ** length_penalty    (EOS not counted)

and the best ``beam_width`` returned, best first, each with its text (prompt and EOS left
out). With length_penalty 0 this is the textbook search transformers' ``num_beams`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from kvflow.outputs import Logprob
from kvflow.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from kvflow.entrypoints.llm import LLM


@dataclass
class BeamSearchSequence:
    """One beam: prompt and generated tokens, the offered log-probabilities of each
    generated position, and their sum along the beam (vLLM's fields)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int] = None


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` beams of one prompt, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


def beam_score(beam: BeamSearchSequence, eos_ids: set[int], length_penalty: float) -> float:
    length = len(beam.tokens) - (1 if beam.tokens[-1] in eos_ids else 0)
    return beam.cum_logprob / (length ** length_penalty)


@dataclass
class _Prompt:
    num_tokens: int
    live: list[BeamSearchSequence]
    done: list[BeamSearchSequence] = field(default_factory=list)


class BeamSearch:
    """The search's state between rounds, whoever runs the engine: ``beam_search`` (the
    offline ``LLM``) and ``beam_search_async`` (an ``AsyncLLM``) drive it::

        search = BeamSearch(prompt_ids, params, eos_ids)
        while batch := search.next_batch():      # token lists to extend by one token
            search.advance(offered)               # each one's {token: Logprob}, same order
        outputs = search.results(tokenizer)
    """

    def __init__(self, prompt_ids: list[list[int]], params: BeamSearchParams,
                 eos_ids: set[int]) -> None:
        self.params = params
        self.eos_ids = eos_ids
        self.states = [_Prompt(len(ids), [BeamSearchSequence(list(ids), [])])
                       for ids in prompt_ids]
        self.rounds = 0
        self._live: list[tuple[_Prompt, BeamSearchSequence]] = []
        self.step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width,
                                          temperature=params.temperature, ignore_eos=True,
                                          detokenize=False)
        """What each round asks the engine for: one token, the top 2 x width offered."""

    def _score(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos_ids, self.params.length_penalty)

    def next_batch(self) -> list[list[int]]:
        """The live beams' tokens to extend; empty when the search is over."""
        if self.rounds >= self.params.max_tokens:
            return []
        self._live = [(state, beam) for state in self.states for beam in state.live]
        return [beam.tokens for _, beam in self._live]

    def advance(self, offered: list[dict[int, Logprob]]) -> None:
        """One round: every live beam grows by each token offered to it."""
        assert len(offered) == len(self._live), (len(offered), len(self._live))
        grown: dict[int, list[BeamSearchSequence]] = {id(s): [] for s in self.states}
        for (state, beam), choices in zip(self._live, offered):
            for token, logprob in choices.items():
                new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [choices],
                                         beam.cum_logprob + logprob.logprob)
                if token in self.eos_ids and not self.params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", token
                    state.done.append(new)
                else:
                    grown[id(state)].append(new)
        width = self.params.beam_width
        for state in self.states:
            state.live = sorted(grown[id(state)], key=self._score, reverse=True)[:width]
        self.rounds += 1

    def results(self, tokenizer: Any) -> list[BeamSearchOutput]:
        """The best ``beam_width`` beams of each prompt, best first, with their text."""
        results = []
        for state in self.states:
            best = sorted(state.done + state.live, key=self._score,
                          reverse=True)[:self.params.beam_width]
            for beam in best:
                beam.finish_reason = beam.finish_reason or "length"
                generated = beam.tokens[state.num_tokens:]
                if beam.stop_reason is not None and not self.params.include_stop_str_in_output:
                    generated = generated[:-1]
                if tokenizer is not None:
                    beam.text = tokenizer.decode(generated)
            results.append(BeamSearchOutput(best))
        return results


def beam_search(llm: LLM, prompts: list[Any], params: BeamSearchParams,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """The beams of each prompt (str, TextPrompt, TokensPrompt or token ids), in order."""
    engine = llm.llm_engine
    search = BeamSearch([engine.tokenize_prompt(p)[1] for p in prompts], params,
                        set(engine.eos_token_ids))
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=params.max_tokens, desc="Beam search", unit="token")
    while batch := search.next_batch():
        outs = llm.generate([{"prompt_token_ids": t} for t in batch], search.step_params,
                            use_tqdm=False)
        search.advance([out.outputs[0].logprobs[0] for out in outs])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return search.results(llm.get_tokenizer())


async def beam_search_async(async_llm: Any, prompt_ids: list[int], params: BeamSearchParams,
                            eos_ids: set[int], request_id: str) -> BeamSearchOutput:
    """One prompt's beams through an ``AsyncLLM``: each round's beams run as concurrent
    requests (``request_id``-round-beam), so they batch with whatever else is served."""
    import asyncio

    from kvflow.sampling_params import RequestOutputKind

    search = BeamSearch([prompt_ids], params, eos_ids)

    async def offered(i: int, tokens: list[int]) -> dict[int, Logprob]:
        final = None
        async for out in async_llm.generate({"prompt_token_ids": tokens}, search.step_params,
                                            f"{request_id}-{search.rounds}-{i}",
                                            output_kind=RequestOutputKind.FINAL_ONLY):
            final = out
        assert final is not None
        return final.outputs[0].logprobs[0]

    while batch := search.next_batch():
        search.advance(list(await asyncio.gather(*(offered(i, t) for i, t in enumerate(batch)))))
    return search.results(async_llm.get_tokenizer())[0]
