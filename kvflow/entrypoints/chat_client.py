"""Terminal clients: ``kvflow chat`` (offline engine or a server) and ``kvflow complete``.

A chat backend turns a conversation into a stream of reply text; the loop
around it (reading lines, printing pieces as they come, keeping the history)
is the same offline and remote. The remote side speaks only HTTP + SSE with
the standard library, so the client needs nothing the engine does not.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Iterator, Optional, Protocol, TextIO

from kvflow.config import EngineArgs

_HELP = "Type a message and Enter. /reset clears the history, /exit (or Ctrl-D) quits."


class ChatBackend(Protocol):
    def stream_reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Yields the assistant's reply to ``messages`` piece by piece."""
        ...


class OfflineChat:
    """Runs the engine in this process; the reply streams step by step from ``LLMEngine``."""

    def __init__(self, args: EngineArgs, *, chat_template: Optional[str], max_tokens: int,
                 temperature: float) -> None:
        from kvflow.engine.llm_engine import LLMEngine
        from kvflow.entrypoints.openai.server import load_chat_template

        self.chat_template = load_chat_template(chat_template)
        self.engine = LLMEngine.from_engine_args(args)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._ids = itertools.count()

    def stream_reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        from kvflow.engine.output_processor import RequestOutputKind
        from kvflow.entrypoints.llm import apply_chat_template
        from kvflow.sampling_params import SamplingParams

        ids = apply_chat_template(self.engine.get_tokenizer(), messages,
                                  chat_template=self.chat_template)
        room = self.engine.config.scheduler_config.max_model_len - len(ids)
        if room <= 0:
            raise ValueError(f"The conversation ({len(ids)} tokens) fills the context; /reset.")
        params = SamplingParams(max_tokens=min(self.max_tokens, room),
                                temperature=self.temperature)
        rid = f"chat-{next(self._ids)}"
        self.engine.add_request(rid, {"prompt_token_ids": ids}, params,
                                output_kind=RequestOutputKind.DELTA)
        done = False
        try:
            while not done and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    for comp in out.outputs:
                        if comp.text:
                            yield comp.text
                    done = out.finished
        finally:
            if not done:  # Ctrl-C mid-reply: free the request's blocks
                self.engine.abort_request(rid)


def _headers(api_key: Optional[str]) -> dict[str, str]:
    key = api_key or os.environ.get("KVFLOW_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode("utf-8", "replace"))
        return f"HTTP {exc.code}: {body['error']['message']}"
    except Exception:
        return f"HTTP {exc.code}: {exc.reason}"


def _api(url: str) -> str:
    """The /v1 base of a server URL given with or without /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def first_model(url: str, api_key: Optional[str]) -> str:
    req = urllib.request.Request(_api(url) + "/models", headers=_headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)["data"][0]["id"]
    except urllib.error.HTTPError as exc:
        raise ValueError(_error_text(exc)) from None
    except urllib.error.URLError as exc:
        raise ValueError(f"Cannot reach {url}: {exc.reason}") from None


def stream_sse(url: str, body: dict[str, Any], api_key: Optional[str]) -> Iterator[dict[str, Any]]:
    """POSTs ``body`` and yields each JSON event until ``data: [DONE]``."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers=_headers(api_key))
    try:
        resp = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as exc:
        raise ValueError(_error_text(exc)) from None
    except urllib.error.URLError as exc:
        raise ValueError(f"Cannot reach {url}: {exc.reason}") from None
    with resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                return
            event = json.loads(payload)
            if "error" in event:
                raise ValueError(f"server error: {event['error'].get('message')}")
            yield event


class RemoteChat:
    """Streams chat completions from a running server (kvflow, vLLM or OpenAI)."""

    def __init__(self, url: str, *, model: Optional[str], api_key: Optional[str],
                 max_tokens: Optional[int], temperature: float) -> None:
        self.url = url
        self.api_key = api_key
        self.model = model or first_model(url, api_key)
        self.max_tokens = max_tokens
        self.temperature = temperature

    def stream_reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True,
                "temperature": self.temperature, "max_completion_tokens": self.max_tokens}
        for event in stream_sse(_api(self.url) + "/chat/completions", body, self.api_key):
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text


def stream_completion(url: str, prompt: str, *, model: Optional[str], api_key: Optional[str],
                      max_tokens: Optional[int], temperature: float) -> Iterator[str]:
    """Yields the text of a streamed /v1/completions answer."""
    body = {"model": model or first_model(url, api_key), "prompt": prompt, "stream": True,
            "max_tokens": max_tokens, "temperature": temperature}
    for event in stream_sse(_api(url) + "/completions", body, api_key):
        for choice in event.get("choices", []):
            if choice.get("text"):
                yield choice["text"]


def chat_loop(backend: ChatBackend, *, system: Optional[str] = None,
              stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> int:
    """Reads user lines, prints streamed replies, keeps the history; returns the exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    if interactive:
        print(_HELP, file=stdout)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        pieces = []
        try:
            for piece in backend.stream_reply(history):
                pieces.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        except ValueError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
