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


def beam_search(llm: LLM, prompts: list[Any], params: BeamSearchParams,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """The beams of each prompt (str, TextPrompt, TokensPrompt or token ids), in order."""
    engine = llm.llm_engine
    eos_ids = set(engine.eos_token_ids)
    tokenizer = llm.get_tokenizer()
    states = []
    for prompt in prompts:
        _, ids = engine.tokenize_prompt(prompt)
        states.append(_Prompt(len(ids), [BeamSearchSequence(list(ids), [])]))
    width = params.beam_width
    step = SamplingParams(max_tokens=1, logprobs=2 * width, temperature=params.temperature,
                          ignore_eos=True, detokenize=False)

    def score(beam: BeamSearchSequence) -> float:
        return beam_score(beam, eos_ids, params.length_penalty)

    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=params.max_tokens, desc="Beam search", unit="token")
    for _ in range(params.max_tokens):
        live = [(state, beam) for state in states for beam in state.live]
        if not live:
            break
        outs = llm.generate([{"prompt_token_ids": beam.tokens} for _, beam in live], step,
                            use_tqdm=False)
        if bar is not None:
            bar.update(1)
        grown: dict[int, list[BeamSearchSequence]] = {id(s): [] for s in states}
        for (state, beam), out in zip(live, outs):
            offered = out.outputs[0].logprobs[0]  # token -> Logprob, the top 2 * width
            for token, logprob in offered.items():
                new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [offered],
                                         beam.cum_logprob + logprob.logprob)
                if token in eos_ids and not params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", token
                    state.done.append(new)
                else:
                    grown[id(state)].append(new)
        for state in states:
            state.live = sorted(grown[id(state)], key=score, reverse=True)[:width]
    if bar is not None:
        bar.close()
    results = []
    for state in states:
        best = sorted(state.done + state.live, key=score, reverse=True)[:width]
        for beam in best:
            beam.finish_reason = beam.finish_reason or "length"
            generated = beam.tokens[state.num_tokens:]
            if beam.stop_reason is not None and not params.include_stop_str_in_output:
                generated = generated[:-1]
            if tokenizer is not None:
                beam.text = tokenizer.decode(generated)
        results.append(BeamSearchOutput(best))
    return results
