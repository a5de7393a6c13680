"""``kvflow`` subcommands: flags generated from EngineArgs, and the terminal clients end to end."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import subprocess
import sys

import pytest
from conftest import ServerProcess

from kvflow import LLM, SamplingParams
from kvflow.config import EngineArgs
from kvflow.entrypoints import cli
from kvflow.entrypoints.openai.server import ServerArgs

MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox"
QUESTIONS = ["What is the capital of France?", "And of Germany?"]


def _run(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflow.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


# ---------------------------------------------------------------------------- flags
def _options(command: str) -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {opt for action in sub.choices[command]._actions for opt in action.option_strings}


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_every_engine_field_is_a_flag(command):
    options = _options(command)
    for f in dataclasses.fields(EngineArgs):
        assert "--" + f.name.replace("_", "-") in options, f.name


def test_vllm_flag_names_and_defaults():
    ns = cli.build_parser().parse_args(["serve", "m"])
    # Every engine default is EngineArgs' (the offline LLM's) but one: like vLLM's server,
    # `serve` logs its load line unless --disable-log-stats.
    assert cli.engine_args_from(ns, "m") == EngineArgs(model="m", disable_log_stats=False)
    assert ns.port == 8000 and ns.host is None and ns.api_key is None
    assert ns.disable_frontend_multiprocessing is False
    assert ns.allowed_origins == ["*"]
    ns = cli.build_parser().parse_args([
        "serve", "m", "--host", "127.0.0.1", "--port", "9001", "--api-key", "k",
        "--served-model-name", "a", "b", "--chat-template", "{{ x }}",
        "--allowed-origins", "http://x", "--uvicorn-log-level", "warning",
        "--max-model-len", "128", "--gpu-memory-utilization", "0.5",
        "--tensor-parallel-size", "2", "--quantization", "awq", "--dtype", "float16",
        "--no-enable-prefix-caching", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
        "--block-size", "32", "--enforce-eager", "--seed", "3", "--trust-remote-code",
        "--load-format", "dummy", "--num-gpu-blocks-override", "none",
        "--disable-frontend-multiprocessing"])
    args = cli.engine_args_from(ns, "m")
    assert (args.max_model_len, args.gpu_memory_utilization, args.tensor_parallel_size) == (
        128, 0.5, 2)
    assert (args.quantization, args.dtype, args.enable_prefix_caching) == ("awq", "float16", False)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (8, 64, 32)
    assert (args.enforce_eager, args.seed, args.trust_remote_code) == (True, 3, True)
    assert args.load_format == "dummy" and args.num_gpu_blocks_override is None
    assert args.served_model_name == "a" and ns.served_model_name == ["a", "b"]
    assert (ns.host, ns.port, ns.api_key, ns.uvicorn_log_level) == (
        "127.0.0.1", 9001, "k", "warning")
    assert ns.disable_frontend_multiprocessing is True
    server_fields = {f.name for f in dataclasses.fields(ServerArgs)}
    assert {"host", "port", "api_key", "chat_template", "allowed_origins"} <= server_fields


@pytest.mark.parametrize("flags, in_process", [([], False),
                                               (["--disable-frontend-multiprocessing"], True)])
def test_serve_runs_the_engine_core_process_unless_told(monkeypatch, flags, in_process):
    from kvflow.engine.async_llm import AsyncLLM

    made = []
    monkeypatch.setattr(AsyncLLM, "from_engine_args", classmethod(
        lambda cls, args, in_process=False: made.append((args.model, in_process))))
    monkeypatch.setattr("kvflow.entrypoints.openai.server.run_server", lambda *_: None)
    assert cli.main(["serve", "m", *flags]) == 0
    assert made == [("m", in_process)]


def test_list_flags_take_vllm_json_form():
    assert cli._json_list(['["http://a", "http://b"]']) == ["http://a", "http://b"]
    assert cli._json_list(["http://a", "http://b"]) == ["http://a", "http://b"]
    with pytest.raises(ValueError, match="not a JSON list"):
        cli._json_list(["[oops"])


def test_no_model_means_the_builtin_default(monkeypatch):
    monkeypatch.setattr("kvflow.models.gguf.default_model_path", lambda: "/models/default.gguf")
    ns = cli.build_parser().parse_args(["serve"])
    assert cli._resolve_model(ns) == "/models/default.gguf"
    assert cli._default_served_name(ns, "/models/default.gguf") == "default"
    ns = cli.build_parser().parse_args(["generate", "hi"])
    assert cli._resolve_model(ns) == "/models/default.gguf"


def _main(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """``kvflow ARGS`` in this process (a subprocess pays seconds of imports each time)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_flag_value_is_a_clean_error(tiny_model, capsys, monkeypatch):
    code, _, err = _main(capsys, monkeypatch, "generate", "hi", "--model", tiny_model,
                         "--block-size", "3")
    assert code == 2
    assert "block_size" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- offline
@pytest.fixture(scope="module")
def offline(tiny_model) -> LLM:
    return LLM(tiny_model, max_model_len=MAX_MODEL_LEN)


def test_generate_prints_greedy_text(tiny_model, offline):
    """Through a real process: ``python -m kvflow.entrypoints.cli`` is what the script runs."""
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10),
                                use_tqdm=False)[0].outputs[0].text
    r = _run("generate", PROMPT, "--model", tiny_model, "--max-tokens", "10",
             "--temperature", "0", "--max-model-len", str(MAX_MODEL_LEN),
             "--chat-template-mode", "off")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    # By default a model with a chat template gets the prompt as a user turn.
    expected_chat = offline.chat([{"role": "user", "content": PROMPT}],
                                 SamplingParams(temperature=0, max_tokens=10),
                                 use_tqdm=False)[0].outputs[0].text
    r = _run("generate", PROMPT, "--model", tiny_model, "--max-tokens", "10",
             "--temperature", "0", "--max-model-len", str(MAX_MODEL_LEN))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_chat + "\n"


def test_readme_main_command_answers_paris():
    """The README's main job: the built-in default model, greedy, through its chat template."""
    r = _run("generate", "What is the capital of France?", "--temperature", "0",
             "--max-tokens", "30", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def _expected_chat(offline: LLM, max_tokens: int) -> list[str]:
    history: list[dict[str, str]] = []
    replies = []
    for q in QUESTIONS:
        history.append({"role": "user", "content": q})
        out = offline.chat(history, SamplingParams(temperature=0, max_tokens=max_tokens),
                           use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": out})
        replies.append(out)
    return replies


def test_offline_chat_is_multi_turn(tiny_model, offline, capsys, monkeypatch):
    code, out, err = _main(capsys, monkeypatch, "chat", "--model", tiny_model, "--max-tokens",
                           "6", "--temperature", "0", "--max-model-len", str(MAX_MODEL_LEN),
                           stdin="\n".join(QUESTIONS) + "\n/exit\n")
    assert code == 0, err
    assert out == "".join(reply + "\n" for reply in _expected_chat(offline, 6))


# ---------------------------------------------------------------------------- clients of a server
@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerProcess(tiny_model, "--max-model-len", str(MAX_MODEL_LEN), "--api-key", "k1")
    yield srv
    srv.close()


def test_complete_client(server, offline, capsys, monkeypatch):
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10),
                                use_tqdm=False)[0].outputs[0].text
    code, out, err = _main(capsys, monkeypatch, "complete", "--url", server.url, PROMPT,
                           "--max-tokens", "10", "--temperature", "0", "--api-key", "k1")
    assert code == 0, err
    assert out == expected + "\n"
    code, _, err = _main(capsys, monkeypatch, "complete", "--url", server.url, PROMPT,
                         "--api-key", "wrong")
    assert code == 2 and "401" in err and "Traceback" not in err


def test_remote_chat_client(server, offline, capsys, monkeypatch):
    code, out, err = _main(capsys, monkeypatch, "chat", "--url", server.url + "/v1",
                           "--max-tokens", "6", "--temperature", "0", "--api-key", "k1",
                           stdin="\n".join(QUESTIONS) + "\n")
    assert code == 0, err
    assert out == "".join(reply + "\n" for reply in _expected_chat(offline, 6))


def test_more_vllm_serve_flags_parse_and_reach_their_settings(tmp_path):
    """Flags vLLM scripts commonly pass: each lands where it acts (or is refused clearly)."""
    from kvflow.entrypoints.openai.server import check_server_args, uvicorn_config

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k")
    cert.write_text("c")
    ns = cli.build_parser().parse_args([
        "serve", "m", "--disable-log-requests", "--max-log-len", "100", "--kv-cache-dtype",
        "auto", "--pipeline-parallel-size", "1", "--root-path", "/llm", "--ssl-keyfile",
        str(key), "--ssl-certfile", str(cert), "--response-role", "bot",
        "--generation-config", "vllm"])
    engine = cli.engine_args_from(ns, "m")
    assert (engine.kv_cache_dtype, engine.pipeline_parallel_size) == ("auto", 1)
    assert engine.generation_config == "vllm"
    server = ServerArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerArgs)
                           if hasattr(ns, f.name)})
    assert server.disable_log_requests and server.max_log_len == 100
    assert server.response_role == "bot"
    check_server_args(server)
    config = uvicorn_config(object(), server)
    assert (config.root_path, config.ssl_keyfile, config.ssl_certfile) == (
        "/llm", str(key), str(cert))
    with pytest.raises(ValueError, match="go together"):
        check_server_args(ServerArgs(ssl_keyfile=str(key)))
    with pytest.raises(ValueError, match=r"--ssl-certfile '/nope.pem' is not a file"):
        check_server_args(ServerArgs(ssl_keyfile=str(key), ssl_certfile="/nope.pem"))


def test_inert_vllm_flags_run_and_refused_values_exit_with_the_reason(capsys):
    ns = cli.build_parser().parse_args([
        "serve", "m", "--task", "generate", "--max-seq-len-to-capture", "8192",
        "--use-v2-block-manager", "--num-scheduler-steps", "1", "--scheduling-policy", "fcfs",
        "--compilation-config", '{"level": 3}', "--guided-decoding-backend", "xgrammar"])
    assert cli.engine_args_from(ns, "m") == EngineArgs(model="m", disable_log_stats=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "m", "--enable-lora"])
    assert exc.value.code == 2
    assert "enable_lora=True is not supported by kvflow: LoRA adapters" in capsys.readouterr().err
    ns = cli.build_parser().parse_args(["generate", "--model", "m", "--hf-overrides", '{"a": 1}',
                                        "hi"])
    with pytest.raises(ValueError, match=r"hf_overrides=\{'a': 1\}.*config.json"):
        cli.engine_args_from(ns, "m")


def test_config_file_flags_and_command_line_wins(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nmax-model-len: 128\nenable_prefix_caching: false\n"
                      "served_model_name: [a, b]\nenforce-eager: true\nenable_lora: false\n"
                      "override_generation_config: {temperature: 0.5}\n")
    argv = cli.expand_config_file(["serve", "m", "--config", str(config), "--port", "9002"])
    ns = cli.build_parser().parse_args(argv)
    assert (ns.port, ns.max_model_len, ns.enable_prefix_caching) == (9002, 128, False)
    assert ns.served_model_name == ["a", "b"] and ns.enforce_eager is True
    assert ns.override_generation_config == {"temperature": 0.5}
    assert cli.expand_config_file(["serve", "m"]) == ["serve", "m"]
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        cli.expand_config_file(["serve", f"--config={tmp_path / 'bad.yaml'}"])
    with pytest.raises(ValueError, match="--config '/nope.yaml'"):
        cli.expand_config_file(["serve", "--config", "/nope.yaml"])
