"""The ``awq_pair`` fixture over tests/awq_checkpoints.py."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from awq_checkpoints import AWQPair, write_awq_pair  # noqa: F401  (tests import AWQPair)


@pytest.fixture(scope="session")
def awq_pair(checkpoint, tmp_path_factory):
    """awq_pair(family, group_size, ...) -> AWQPair, cached per arguments."""
    made: dict[tuple, AWQPair] = {}

    def make(family: str = "llama", group_size: Optional[int] = 32, **kwargs: Any) -> AWQPair:
        key = (family, group_size, repr(sorted(kwargs.items())))
        if key not in made:
            root = str(tmp_path_factory.mktemp(f"awq-{family}"))
            made[key] = write_awq_pair(checkpoint(family), root, group_size=group_size, **kwargs)
        return made[key]

    return make
