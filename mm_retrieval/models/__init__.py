"""Model definitions (torch modules and their configs).

Exports are resolved lazily so ``import mm_retrieval.models`` stays cheap (no torch import) until
a model class is actually used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mm_retrieval.models.reranker import Reranker, RerankerConfig

_LAZY = {
    "Reranker": "mm_retrieval.models.reranker",
    "RerankerConfig": "mm_retrieval.models.reranker",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
