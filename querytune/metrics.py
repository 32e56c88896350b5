"""Ranking metrics against graded relevance, and a paired bootstrap for comparing two systems.

Grades: 2 = satisfies the need, 1 = nearly (right kind and place, one constraint missed), 0 = not.
NDCG@k uses gains 2^grade - 1 and log2 discounts; Recall@k and MRR count a result as relevant when it
satisfies the need (grade 2). Recall@k is capped: hits / min(k, number of satisfying businesses), so a
need with 40 satisfying businesses can still reach 1.0 at k=10.
"""

from __future__ import annotations

import math

import numpy as np


def dcg(grades: list[int]) -> float:
    return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(grades))


def ndcg_at_k(ranked: list[str], relevance: dict[str, int], k: int = 10) -> float:
    """
    >>> ndcg_at_k(["a", "b"], {"a": 2, "b": 1}, k=10)
    1.0
    >>> round(ndcg_at_k(["b", "a"], {"a": 2, "b": 1}, k=10), 4)
    0.7967
    """
    ideal = dcg(sorted(relevance.values(), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg([relevance.get(b, 0) for b in ranked[:k]]) / ideal


def recall_at_k(ranked: list[str], relevance: dict[str, int], k: int = 10, grade: int = 2) -> float:
    """
    >>> recall_at_k(["a", "x", "b"], {"a": 2, "b": 2, "c": 2, "d": 1}, k=2)
    0.5
    """
    relevant = {b for b, g in relevance.items() if g >= grade}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / min(k, len(relevant))


def mrr(ranked: list[str], relevance: dict[str, int], grade: int = 2) -> float:
    """
    >>> mrr(["x", "y", "a"], {"a": 2})
    0.3333333333333333
    """
    for i, b in enumerate(ranked):
        if relevance.get(b, 0) >= grade:
            return 1.0 / (i + 1)
    return 0.0


def ranking_metrics(ranked: list[str], relevance: dict[str, int], k: int = 10) -> dict[str, float]:
    return {f"ndcg@{k}": ndcg_at_k(ranked, relevance, k), f"recall@{k}": recall_at_k(ranked, relevance, k),
            "mrr": mrr(ranked, relevance)}


def paired_bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a over paired items with a 95% bootstrap interval."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    return {"mean": float(diff.mean()), "low": float(np.percentile(means, 2.5)), "high": float(np.percentile(means, 97.5))}
