"""vLLM's LLM methods beyond generate/chat that scripts call: reset_prefix_cache, chat tools."""

from __future__ import annotations

import pytest

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


PARTS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:"  # (a newline after a block tag
                  "{% for part in m['content'] %}<{{ part['text'] }}>{% endfor %}"  # is trimmed)
                  "{{ '\\n' }}{% endfor %}")


def test_chat_content_parts_as_vllm(checkpoint):
    """Lists of OpenAI content parts: joined for templates that print content (vLLM's
    "string"), kept for templates that loop over it ("openai"); "auto" tells them apart."""
    llm = LLM(checkpoint("llama"), max_model_len=128)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=1)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                          {"type": "text", "text": "there"}]}]
    joined = llm.chat(parts, params, chat_template=TOOLS_TEMPLATE, use_tqdm=False)[0]
    as_string = llm.chat([{"role": "user", "content": "Hi\nthere"}], params,
                         chat_template=TOOLS_TEMPLATE, use_tqdm=False)[0]
    assert joined.prompt_token_ids == as_string.prompt_token_ids
    for content_format in ("auto", "openai"):
        kept = llm.chat(parts, params, chat_template=PARTS_TEMPLATE, use_tqdm=False,
                        chat_template_content_format=content_format)[0]
        assert kept.prompt_token_ids == tok.encode("user:<Hi><there>\n", add_special_tokens=False)
    image = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[1\] has type 'image_url'"):
        llm.chat(image, params, chat_template=TOOLS_TEMPLATE, use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template_content_format='html'"):
        llm.chat(parts, params, chat_template_content_format="html", use_tqdm=False)


def test_vllm_per_call_arguments(checkpoint):
    llm = LLM(checkpoint("llama"), max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=2)
    prompts = [{"prompt_token_ids": [1, 5, 6]}, {"prompt_token_ids": [1, 7]}]
    base = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    same = llm.generate(prompts, params, False, None, prompt_adapter_request=None,
                        guided_options_request=None, priority=[0, 0])
    assert [o.outputs[0].token_ids for o in same] == base
    for kwargs, match in [({"lora_request": object()}, "LoRA adapters are not supported"),
                          ({"guided_options_request": {"guided_json": {}}}, "guided"),
                          ({"priority": [1, 0]}, "first come, first served"),
                          ({"priority": [0]}, "pass None or 2 zeros")]:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompts, params, use_tqdm=False, **kwargs)
    with pytest.raises(ValueError, match="kvflow serves text models"):
        llm.chat([{"role": "user", "content": "Hi"}], params, chat_template=TOOLS_TEMPLATE,
                 use_tqdm=False, mm_processor_kwargs={"num_crops": 4})
    assert llm.reset_prefix_cache() is True  # nothing was left queued by the refusals


def test_use_tqdm_takes_a_bar_class(checkpoint):
    """vLLM lets ``use_tqdm`` be the tqdm-like class that draws the bar."""
    made = []

    class Bar:
        def __init__(self, **kwargs):
            made.append(kwargs)
            self.updates, self.postfix = 0, ""

        def update(self, n):
            self.updates += n

        def close(self):
            made.append(self.updates)

    llm = LLM(checkpoint("llama"), max_model_len=128)
    llm.generate([{"prompt_token_ids": [1, 5]}] * 3, SamplingParams(max_tokens=2), use_tqdm=Bar)
    assert made[0]["total"] == 3 and made[-1] == 3


def _traces(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".pt.trace.json.gz"))


def test_start_and_stop_profile(checkpoint, tmp_path, monkeypatch):
    """vLLM's LLM.start_profile/stop_profile: a torch.profiler trace of what ran between."""
    import gzip
    import json

    llm = LLM(checkpoint("llama"), max_model_len=128)
    monkeypatch.delenv("KVFLOW_TORCH_PROFILER_DIR", raising=False)
    with pytest.raises(RuntimeError, match="set KVFLOW_TORCH_PROFILER_DIR"):
        llm.start_profile()
    monkeypatch.setenv("KVFLOW_TORCH_PROFILER_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="not running"):
        llm.stop_profile()
    llm.start_profile()
    with pytest.raises(RuntimeError, match="already running"):
        llm.start_profile()
    llm.generate({"prompt_token_ids": [1, 5, 6]}, SamplingParams(max_tokens=3), use_tqdm=False)
    llm.stop_profile()
    (trace,) = _traces(tmp_path)
    assert trace.name.startswith("rank0.")
    with gzip.open(trace, "rt", encoding="utf-8") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "aten::linear" in names or "aten::mm" in names or "aten::addmm" in names
    llm.generate({"prompt_token_ids": [1, 5]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(_traces(tmp_path)) == 1  # stopped: nothing more written


def test_vllm_import_surface(checkpoint):
    """A vLLM script's imports with the package name changed: prompt types, the async
    engine's names, RequestOutputKind where vLLM keeps it."""
    import asyncio

    import kvflow
    from kvflow import AsyncEngineArgs, AsyncLLMEngine, TextPrompt, TokensPrompt
    from kvflow.sampling_params import RequestOutputKind

    path = checkpoint("llama")
    llm = LLM(path, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    ids = llm.get_tokenizer().encode("Hello there")
    by_type = llm.generate([TextPrompt(prompt="Hello there"), TokensPrompt(prompt_token_ids=ids)],
                           params, use_tqdm=False)
    assert by_type[0].prompt_token_ids == ids
    assert by_type[0].outputs[0].token_ids == by_type[1].outputs[0].token_ids
    assert AsyncEngineArgs is kvflow.EngineArgs

    async def stream() -> list[str]:
        engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(model=path, max_model_len=128, dtype="float32"), in_process=True)
        deltas = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        try:
            return [out.outputs[0].text async for out in
                    engine.generate(TextPrompt(prompt="Hello there"), deltas, "r1")]
        finally:
            await engine.shutdown()

    pieces = asyncio.run(stream())
    assert len(pieces) == 3 and "".join(pieces) == by_type[0].outputs[0].text
