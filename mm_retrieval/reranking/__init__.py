"""Reranking: checkpoints for the cross-attention reranker (:mod:`mm_retrieval.models.reranker`).

Exports are resolved lazily so importing the package does not import torch/safetensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mm_retrieval.reranking.checkpoint import RERANKER_FORMAT, load_reranker, save_reranker

_LAZY = {
    "RERANKER_FORMAT": "mm_retrieval.reranking.checkpoint",
    "load_reranker": "mm_retrieval.reranking.checkpoint",
    "save_reranker": "mm_retrieval.reranking.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
