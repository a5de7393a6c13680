"""A real ``kvflow serve`` process on a free loopback port, started once per test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import httpx
import psutil
import pytest

MAX_MODEL_LEN = 512
"""Room for LangChain's VLLMOpenAI default of max_tokens=256 after a short prompt."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m kvflow.entrypoints.cli serve MODEL ...`` with its log in a temp file."""

    def __init__(self, model: str, *args: str, env: Optional[dict[str, str]] = None,
                 startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "kvflow.entrypoints.cli", "serve", model,
               "--host", "127.0.0.1", "--port", str(self.port), "--disable-uvicorn-access-log",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it hangs; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)


@pytest.fixture(scope="session")
def tiny_model(checkpoint) -> str:
    return checkpoint("llama")


def metrics_values(url: str, **headers: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from the Prometheus text at /metrics."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric(values: dict[str, float], name: str) -> float:
    """Sum of every series of ``name`` (any labels)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def is_running(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie awaiting its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def engine_core_pids(pid: int) -> list[int]:
    """The engine core processes of the server with this pid (its multiprocessing children
    other than multiprocessing's resource tracker)."""
    return [child.pid for child in psutil.Process(pid).children()
            if "spawn_main" in " ".join(child.cmdline())]
