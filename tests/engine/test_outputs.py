"""Text outputs: incremental detokenization (multi-byte), stop strings, streaming deltas, chat."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kvflow import SamplingParams
from tiny_models import LLM32 as LLM
from kvflow.engine.detokenizer import IncrementalDetokenizer
from kvflow.engine.output_processor import RequestOutputKind

TEXTS = ["法国的首都是哪里？巴黎是法国的首都。", "Emoji 😀 🚀 and café naïve.",
         "def add(a, b):\n    return a + b", "Hello world! <|im_end|> after"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_text_equals_full_decode(tokenizer_dir, text, skip_special):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = tok.encode("Question:")
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special,
                                   spaces_between_special_tokens=True, stop=[],
                                   include_stop_str_in_output=False)
    pieces = []
    for t in ids:
        before = len(detok.text)
        detok.update([t])
        pieces.append(detok.text[before:])
        assert "\ufffd" not in detok.text  # half characters are held back
    detok.flush()
    assert detok.text == tok.decode(ids, skip_special_tokens=skip_special)


def test_byte_split_characters_are_held_back(tokenizer_dir):
    # Single bytes of a 4-byte emoji: nothing printable until the last byte arrives.
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    byte_ids = [tok.convert_tokens_to_ids(c) for c in "ðŁĺĢ"]  # byte-level form of 😀
    assert None not in byte_ids and tok.decode(byte_ids) == "😀"
    detok = IncrementalDetokenizer(tok, [1], skip_special_tokens=True,
                                   spaces_between_special_tokens=True, stop=[],
                                   include_stop_str_in_output=False)
    for t in byte_ids[:-1]:
        detok.update([t])
        assert detok.text == ""
    detok.update([byte_ids[-1]])
    assert detok.text == "😀"


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("llama"), max_model_len=256)


def test_final_text_matches_decode_and_stop_strings(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert base.text == tok.decode(base.token_ids, skip_special_tokens=True)
    assert len(base.text) > 6
    stop = base.text[3:6]
    out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=20, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:base.text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=20, stop=stop,
                                                      include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[:base.text.index(stop) + len(stop)]
    assert llm.llm_engine.scheduler.kv_cache_manager.num_free_blocks == llm.llm_engine.num_blocks


def test_streaming_deltas_join_to_final_text(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("delta", "Hello world", params, output_kind=RequestOutputKind.DELTA)
    text, tokens, n_outputs = "", [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text
            tokens += out.outputs[0].token_ids
            n_outputs += 1
    final = llm.generate("Hello world", params, use_tqdm=False)[0].outputs[0]
    assert text == final.text and tokens == final.token_ids and n_outputs == 20


def test_chat_applies_template(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    direct = llm.generate({"prompt_token_ids": out.prompt_token_ids}, params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    two = llm.chat([messages, messages[1:]], params, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].text == out.outputs[0].text


def test_generate_prompt_forms_and_order(llm):
    tok = llm.get_tokenizer()
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = tok.encode("Hello world")
    forms = ["Hello world", {"prompt": "Hello world"}, {"prompt_token_ids": ids}]
    outs = llm.generate(forms, p, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].prompt == "Hello world" and outs[2].prompt is None
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    single = llm.generate("Hello world", p, use_tqdm=False)
    assert len(single) == 1 and single[0].finished
    per_prompt = llm.generate(["a", "b"], [p, SamplingParams(temperature=0, max_tokens=2)],
                              use_tqdm=False)
    assert len(per_prompt[0].outputs[0].token_ids) == 4
    assert len(per_prompt[1].outputs[0].token_ids) <= 2
