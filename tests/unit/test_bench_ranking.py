"""Rank agreement helpers of the benchmarks (bench/ranking.py) against scipy's definitions."""

import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from mm_retrieval.bench.ranking import agreement, kendall_tau, top_k_overlap


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_is_scipys_tau_b(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 40).astype(float)  # many ties
    b = a + rng.normal(0, 2, 40).round()
    assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_tau_edges():
    x = np.arange(10.0)
    assert kendall_tau(x, x) == 1 and kendall_tau(x, -x) == -1
    assert math.isnan(kendall_tau(x, np.ones(10)))


def test_top_k_overlap():
    a = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2], dtype=float)
    b = a.copy()
    b[[0, 11]] = b[[11, 0]]  # the best and the worst swap: 9 of the top 10 remain
    assert top_k_overlap(a, a) == 1 and top_k_overlap(a, b) == 0.9
    assert top_k_overlap(a[:4], -a[:4], k=10) == 1  # k is capped at the candidate count
    assert top_k_overlap(a[:4], -a[:4], k=2) == 0


def test_agreement_report():
    a = np.linspace(0, 1, 20)
    r = agreement(a, a + 0.25)
    assert r == {"max_abs_score_diff": pytest.approx(0.25), "kendall_tau": 1.0, "top10_overlap": 1.0, "k": 10}
