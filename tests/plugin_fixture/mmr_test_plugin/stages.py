"""Stages registered with the decorator when this module is imported."""

from dataclasses import dataclass

import numpy as np

from mm_retrieval.registry import register
from mm_retrieval.stages.base import Reranker


@dataclass(frozen=True)
class ReverseConfig:
    weight: float = 1.0


@register("reranker", "reverse")
class ReverseReranker(Reranker):
    """Ranks the first stage's hits in reverse: easy to observe in a test."""

    Config = ReverseConfig

    def score(self, query, hits):
        return -self.config.weight * np.array([h.retrieval_score for h in hits])

    def token_writer(self):
        return None  # reads nothing from the token cache
