"""Image-caption sets the project generates itself (no downloads), for tests, the demo and benchmarks.

* :func:`generate_compositional` -- two/three-object scenes with attribute/relation captions,
  contrast groups and a held-out split of unseen combinations (see :mod:`.compositional`).
* :func:`generate_named` -- look-alike images whose captions carry names and places the pixels
  don't show (see :mod:`.named`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mm_retrieval.datasets.compositional import CompositionalSet, check_heldout, generate_compositional
    from mm_retrieval.datasets.named import NamedSet, generate_named

__all__ = ["CompositionalSet", "NamedSet", "check_heldout", "generate_compositional", "generate_named"]

_HOMES = {
    "CompositionalSet": "compositional",
    "check_heldout": "compositional",
    "generate_compositional": "compositional",
    "NamedSet": "named",
    "generate_named": "named",
}


def __getattr__(name: str):
    # Lazy, so `python -m mm_retrieval.datasets.compositional` does not import the module twice.
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
