"""The encoder contract on the built-in open_clip encoder (tiny config, seeded random weights)."""

from __future__ import annotations

import pytest

from mm_retrieval import registry
from mm_retrieval.testing.contracts import EncoderContract
from tests.helpers import TINY


@pytest.fixture(scope="module")
def encoder():
    return registry.create("encoder", "open_clip", {**TINY, "workers": 0})


class TestOpenClipEncoder(EncoderContract):
    pass  # the module's `encoder` fixture: loaded once for every test
