"""How close two scorings of the same candidates are: score differences and rank agreement."""

from __future__ import annotations

from typing import Any

import numpy as np


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors (ties counted as neither concordant nor discordant,
    normalised for them as scipy's default does); nan when either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n_a, n_b = np.count_nonzero(da), np.count_nonzero(db)
    if n_a == 0 or n_b == 0:
        return float("nan")
    return float((da * db).sum() / np.sqrt(float(n_a) * float(n_b)))


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Share of the top ``k`` by ``a`` that are also in the top ``k`` by ``b`` (ties broken by
    position, as a stable sort of the hits does)."""
    k = min(k, len(a))
    if k == 0:
        return float("nan")
    top_a = set(np.argsort(-np.asarray(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.asarray(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(reference: np.ndarray, other: np.ndarray, k: int = 10) -> dict[str, Any]:
    """Max absolute score difference, Kendall tau and top-``k`` overlap of ``other`` against
    ``reference`` (same candidates, same order)."""
    reference, other = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    return {
        "max_abs_score_diff": float(np.abs(reference - other).max()) if len(reference) else 0.0,
        "kendall_tau": round(kendall_tau(reference, other), 4),
        f"top{k}_overlap": round(top_k_overlap(reference, other, k), 4),
        "k": min(k, len(reference)),
    }
