"""kvflow's logger: INFO lines like vLLM's (block count at start, finished requests).

A handler is attached only if the application configured none, so embedding
programs keep control (set the "kvflow" logger's level or handlers to change it).
"""

from __future__ import annotations

import logging
from kvflow import envs

_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def init_logger(name: str = "kvflow") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("kvflow")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(envs.logging_level())
        root.propagate = False
    return logger
