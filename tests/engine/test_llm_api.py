"""vLLM's LLM methods beyond generate/chat that scripts call: reset_prefix_cache, chat tools."""

from __future__ import annotations

import tiny_models
from kvflow import SamplingParams
from tiny_models import LLM32 as LLM

TOOLS_TEMPLATE = ("{% if tools %}[tools: {{ tools | map(attribute='name') | join(',') }}]"
                  "{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                  "{% endfor %}")


def test_reset_prefix_cache_makes_a_prompt_compute_again(checkpoint):
    llm = LLM(checkpoint("llama"), max_model_len=128, block_size=4)
    prompt = {"prompt_token_ids": tiny_models.random_prompts(420, [33])[0]}
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 32  # whole blocks
    assert llm.reset_prefix_cache() is True
    fresh = llm.generate(prompt, params, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0
    assert fresh.outputs[0].token_ids == first.outputs[0].token_ids
    llm.llm_engine.scheduler.check_integrity()


def test_reset_prefix_cache_refuses_while_blocks_are_held(checkpoint):
    llm = LLM(checkpoint("llama"), max_model_len=128)
    engine = llm.llm_engine
    engine.add_request("held", {"prompt_token_ids": [1, 5, 6, 7]},
                       SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert llm.reset_prefix_cache() is False  # a request holds blocks: nothing dropped
    engine.abort_request(["held"])
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.reset_prefix_cache() is True


def test_chat_tools_reach_the_template(checkpoint):
    llm = LLM(checkpoint("llama"), max_model_len=128)
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hi"}]
    tools = [{"name": "get_weather", "parameters": {}}, {"name": "add", "parameters": {}}]
    params = SamplingParams(temperature=0, max_tokens=1)
    out = llm.chat(messages, params, chat_template=TOOLS_TEMPLATE, tools=tools,
                   use_tqdm=False)[0]
    expected = tok.encode("[tools: get_weather,add]user: Hi\n", add_special_tokens=False)
    assert out.prompt_token_ids == expected
    plain = llm.chat(messages, params, chat_template=TOOLS_TEMPLATE, use_tqdm=False)[0]
    assert plain.prompt_token_ids == tok.encode("user: Hi\n", add_special_tokens=False)
