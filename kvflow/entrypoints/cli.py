"""The ``kvflow`` command: ``serve``, ``generate``, ``chat`` and ``complete``.

Engine flags are not written here: they are generated from the fields of
``EngineArgs`` (and the server's from ``ServerArgs``), with vLLM's spelling
(``max_model_len`` -> ``--max-model-len``), the dataclass default, booleans as
``--flag/--no-flag``, the field's docstring as help and ``metadata["choices"]``
as the allowed values. Adding an engine
option to ``EngineArgs`` adds the flag to every subcommand that builds an engine.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import logging
import sys
import textwrap
import typing
from typing import Any, Optional, Sequence, Union

from kvflow import __version__
from kvflow.config import EngineArgs
from kvflow.vllm_compat import INERT_OPTIONS, drop_inert_options

_MULTI_NAME_FIELDS = {"served_model_name"}
"""EngineArgs fields that the CLI takes as a list (vLLM accepts several served names)."""


# ---------------------------------------------------------------------------- flag generation
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) of a dataclass, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _none_or(convert: Any) -> Any:
    """A converter for Optional fields: ``none`` on the command line means None."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *,
                        title: str, skip: Sequence[str] = ()) -> list[str]:
    """Adds one flag per field of ``cls``; returns the field names (the dests)."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    group = parser.add_argument_group(title)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_") or not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = docs.get(f.name, f"{cls.__name__}.{f.name}")
        base, optional = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in _MULTI_NAME_FIELDS:
            kwargs.update(nargs="+", type=str, metavar="NAME")
        elif base is dict or typing.get_origin(base) is dict:
            kwargs.update(type=_json_object, metavar="JSON")
        elif typing.get_origin(base) is list:
            (item,) = typing.get_args(base) or (str,)
            kwargs.update(nargs="+", type=item, metavar=f.name.upper())
        elif base in (int, float, str):
            kwargs.update(type=_none_or(base) if optional else base, metavar=base.__name__.upper())
        else:
            kwargs.update(type=str)
        group.add_argument(flag, **kwargs)
        names.append(f.name)
    return names


_INERT_DEST = "inert_vllm_"
"""Prefix of the namespace names the inert vLLM flags land under."""


def add_inert_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags for machinery kvflow lacks (``kvflow.vllm_compat``): accepted at values
    that change nothing, refused with the reason by ``engine_args_from`` otherwise."""
    group = parser.add_argument_group(
        "vLLM options kvflow has no use for (accepted where they change nothing)")
    for name, option in INERT_OPTIONS.items():
        kwargs: dict[str, Any] = {"dest": _INERT_DEST + name, "default": None,
                                  "help": option.why or "no effect in kvflow"}
        if option.kind == "flag":
            kwargs.update(action="store_const", const=True)
        elif option.kind == "json":
            kwargs.update(type=_json_value, metavar="JSON")
        else:
            kwargs.update(type=int if option.kind == "int" else str,
                          metavar=option.kind.upper())
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def _json_object(text: str) -> dict:
    """A JSON-object flag value (``--override-generation-config '{"temperature": 0.5}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _json_value(text: str) -> Any:
    """A JSON flag value (vLLM's dict-valued flags); a bare word stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def engine_args_from(ns: argparse.Namespace, model: str) -> EngineArgs:
    drop_inert_options({name: getattr(ns, _INERT_DEST + name) for name in INERT_OPTIONS
                        if getattr(ns, _INERT_DEST + name, None) is not None})
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)
              if hasattr(ns, f.name)}
    names = values.get("served_model_name")
    if isinstance(names, list):
        values["served_model_name"] = names[0] if names else None
    values["model"] = model
    return EngineArgs(**values)


def _resolve_model(ns: argparse.Namespace) -> str:
    """The positional model, else --model, else the built-in default GGUF."""
    model = getattr(ns, "model_tag", None) or getattr(ns, "model", "") or ""
    if not model:
        from kvflow.models.gguf import default_model_path

        model = default_model_path()
        logging.getLogger("kvflow").info("no model given: using the built-in default %s", model)
    return model


# ---------------------------------------------------------------------------- subcommands
def _serve(ns: argparse.Namespace) -> int:
    from kvflow.engine.async_llm import AsyncLLM
    from kvflow.entrypoints.openai.server import (
        ServerArgs,
        check_server_args,
        load_chat_template,
        run_server,
    )

    model = _resolve_model(ns)
    load_chat_template(ns.chat_template)  # fail before loading the model, not after
    server_values = {f.name: _json_list(getattr(ns, f.name))
                     for f in dataclasses.fields(ServerArgs) if hasattr(ns, f.name)}
    names = ns.served_model_name or [_default_served_name(ns, model)]
    engine_args = engine_args_from(ns, model)
    server_args = ServerArgs(**server_values, served_model_names=list(names),
                             log_stats=not engine_args.disable_log_stats)
    check_server_args(server_args)  # before the model loads, not at the socket
    engine_args.served_model_name = names[0]
    async_llm = AsyncLLM.from_engine_args(
        engine_args, in_process=server_args.disable_frontend_multiprocessing)
    run_server(async_llm, server_args)
    return 0


def _json_list(value: Any) -> Any:
    """vLLM takes list flags as one JSON string (``--allowed-origins '["http://a"]'``);
    kvflow also takes them as separate words. Both give the same list."""
    if isinstance(value, list) and len(value) == 1 and value[0].lstrip().startswith("["):
        try:
            parsed = json.loads(value[0])
        except json.JSONDecodeError:
            raise ValueError(f"{value[0]!r} is not a JSON list.") from None
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return value


def _default_served_name(ns: argparse.Namespace, model: str) -> str:
    """The model argument as typed; the built-in default answers to its file's stem."""
    given = getattr(ns, "model_tag", None) or getattr(ns, "model", "")
    if given:
        return given
    import os

    return os.path.splitext(os.path.basename(model))[0]


def _generate(ns: argparse.Namespace) -> int:
    from kvflow.entrypoints.llm import LLM
    from kvflow.sampling_params import SamplingParams

    args = engine_args_from(ns, _resolve_model(ns))
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)}
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature,
                            top_p=ns.top_p, seed=ns.sampling_seed)
    tokenizer = llm.get_tokenizer()
    use_template = ns.chat_template_mode == "on" or (
        ns.chat_template_mode == "auto" and getattr(tokenizer, "chat_template", None))
    if use_template:
        # An instruct model answers a prompt sent as a user turn; raw text it may just end.
        outputs = llm.chat([[{"role": "user", "content": p}] for p in ns.prompt], params,
                           use_tqdm=False)
    else:
        outputs = llm.generate(list(ns.prompt), params, use_tqdm=False)
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {out.prompt!r}")
        print(out.outputs[0].text, flush=True)
    return 0


def _chat(ns: argparse.Namespace) -> int:
    from kvflow.entrypoints import chat_client

    if ns.url:
        backend: chat_client.ChatBackend = chat_client.RemoteChat(
            ns.url, model=ns.model or None, api_key=ns.api_key,
            max_tokens=ns.max_tokens, temperature=ns.temperature)
    else:
        args = engine_args_from(ns, _resolve_model(ns))
        backend = chat_client.OfflineChat(args, chat_template=ns.chat_template,
                                          max_tokens=ns.max_tokens, temperature=ns.temperature)
    return chat_client.chat_loop(backend, system=ns.system)


def _complete(ns: argparse.Namespace) -> int:
    from kvflow.entrypoints import chat_client

    for piece in chat_client.stream_completion(
            ns.url, ns.prompt, model=ns.model, api_key=ns.api_key, max_tokens=ns.max_tokens,
            temperature=ns.temperature):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------- parser
def _add_sampling_flags(p: argparse.ArgumentParser, max_tokens: Optional[int]) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="Most tokens to generate per reply.")
    g.add_argument("--temperature", type=float, default=1.0, help="0 means greedy.")


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("client")
    g.add_argument("--api-key", default=None,
                   help="Bearer key of the server (default: $KVFLOW_API_KEY or $OPENAI_API_KEY).")


def build_parser() -> argparse.ArgumentParser:
    from kvflow.entrypoints.openai.server import ServerArgs

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="kvflow", description="kvflow: LLM inference engine.")
    parser.add_argument("--version", action="version", version=f"kvflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", formatter_class=fmt,
                           help="Serve a model over an OpenAI-compatible HTTP API.")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="Model folder, .gguf file or hub id (default: the built-in model).")
    add_dataclass_flags(serve, ServerArgs, title="server")
    add_dataclass_flags(serve, EngineArgs, title="engine")
    add_inert_vllm_flags(serve)
    serve.add_argument("--config", metavar="FILE",
                       help="YAML mapping of flag names to values (vLLM's --config); flags "
                            "given on the command line win")
    serve.set_defaults(func=_serve, disable_log_stats=False)  # the server logs its load

    gen = sub.add_parser("generate", formatter_class=fmt,
                         help="Generate text for prompts offline and print it.")
    gen.add_argument("prompt", nargs="+", help="One or more prompts.")
    _add_sampling_flags(gen, max_tokens=128)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None,
                     help="Seed of the sampling (--seed seeds the engine).")
    gen.add_argument("--chat-template-mode", choices=["auto", "on", "off"], default="auto",
                     help="Send each prompt as a user turn through the model's chat template: "
                          "auto = when the tokenizer has one; off = raw completion.")
    add_dataclass_flags(gen, EngineArgs, title="engine")
    add_inert_vllm_flags(gen)
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", formatter_class=fmt,
                          help="Chat in the terminal, offline or with a server (--url).")
    chat.add_argument("--url", default=None,
                      help="Base URL of a running server (http://host:8000); offline if unset.")
    chat.add_argument("--system", default=None, help="System prompt of the conversation.")
    chat.add_argument("--chat-template", default=None,
                      help="Offline only: Jinja template (or file) overriding the tokenizer's.")
    _add_sampling_flags(chat, max_tokens=512)
    _add_client_flags(chat)
    add_dataclass_flags(chat, EngineArgs, title="engine (offline only)")
    add_inert_vllm_flags(chat)
    chat.set_defaults(func=_chat)

    comp = sub.add_parser("complete", formatter_class=fmt,
                          help="Stream a completion of a prompt from a running server.")
    comp.add_argument("prompt", help="The prompt text.")
    comp.add_argument("--url", required=True, help="Base URL of the server (http://host:8000).")
    comp.add_argument("--model", default=None, help="Served model name (default: the first).")
    _add_sampling_flags(comp, max_tokens=128)
    _add_client_flags(comp)
    comp.set_defaults(func=_complete)
    return parser


def expand_config_file(argv: Sequence[str]) -> list[str]:
    """``--config FILE`` (vLLM's): the YAML mapping's keys as flags, placed before the
    command line's own so that those win (argparse keeps the last value of a flag).

    Keys are flag names with ``-`` or ``_``; ``true`` is a bare switch, ``false`` its
    ``--no-`` form, a list gives several words, a mapping its JSON.
    """
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args)
                                                              else "")
            rest = args[:i] + args[i + (1 if "=" in arg else 2):]
            break
    else:
        return args
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ValueError(f"--config {path!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path!r} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values.")
    flags: list[str] = []
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            if str(key).replace("-", "_") not in INERT_OPTIONS:  # those switches have no --no-
                flags.append("--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    command = 1 if rest and not rest[0].startswith("-") else 0  # after `serve`
    return rest[:command] + flags + rest[command:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        argv = expand_config_file(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        parser.exit(2, f"kvflow: error: {exc}\n")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if ns.command == "serve" else logging.WARNING,
        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        return int(ns.func(ns) or 0)
    except ValueError as exc:  # bad flag values or model: the message says what to change
        parser.exit(2, f"kvflow {ns.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
