"""Helpers that test modules import (``from tests.helpers import ...``); fixtures live in the
repository's conftest.py. Images and colours come from :mod:`mm_retrieval.testing.images`,
shipped for plugin authors too, so there is one definition of each."""

from __future__ import annotations

import socket

from mm_retrieval.testing.images import COLORS, make_image

__all__ = ["COLORS", "TINY", "free_port", "make_image"]

# The tiny open_clip config with seeded random weights: real code paths, no download.
TINY = {"model": "mmr-tiny", "pretrained": "none"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def numbers(node, path=""):
    """Every number in a JSON document, with where it is (booleans are not numbers here)."""
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from numbers(v, f"{path}[{i}]")
