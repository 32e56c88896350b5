"""Ranking metrics against graded relevance, micro F1, and the one bootstrap: intervals of a metric and of the
difference between two systems on the same rows.

Grades: 2 = satisfies the need, 1 = nearly (right kind and place, one constraint missed), 0 = not.
NDCG@k uses gains 2^grade - 1 and log2 discounts; Recall@k and MRR count a result as relevant when it
satisfies the need (grade 2). Recall@k is capped: hits / min(k, number of satisfying businesses), so a
need with 40 satisfying businesses can still reach 1.0 at k=10.
"""

from __future__ import annotations

import math

import numpy as np


# by hand, not ir-measures: Recall@k is capped (no trec_eval measure), world/output.py scores every shown list, and
# pytrec_eval took 5x as long on 5,000 queries x 9 systems; tests/test_metrics.py checks all three against it
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
    return {
        f"ndcg@{k}": ndcg_at_k(ranked, relevance, k),
        f"recall@{k}": recall_at_k(ranked, relevance, k),
        "mrr": mrr(ranked, relevance),
    }


def micro_f1(tp, fp, fn):
    """F1 from summed counts, 2tp / (2tp + fp + fn) (= 2PR / (P + R)), elementwise over arrays;
    0 where nothing is counted.

    >>> round(float(micro_f1(3, 1, 2)), 4), float(micro_f1(0, 0, 0))
    (0.6667, 0.0)
    """
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    counted = 2 * tp + fp + fn
    return np.where(counted > 0, 2 * tp / np.maximum(counted, 1), 0.0)


def bootstrap(statistic, columns: dict[str, np.ndarray], n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """`statistic` of the columns and its percentile 95% interval (scipy's `stats.bootstrap`, rows resampled together
    across columns: paired). `statistic(columns, axis)` takes a dict of arrays and reduces along `axis`.

    >>> value, low, high = bootstrap(lambda c, axis: c["ok"].mean(axis=axis), {"ok": np.array([1.0] * 80 + [0.0] * 20)})
    >>> value, low < 0.8 < high, round(high - low, 1)
    (0.8, True, 0.2)
    """
    from scipy.stats import bootstrap as scipy_bootstrap

    names = list(columns)
    samples = [np.asarray(columns[k], dtype=float) for k in names]
    if not samples or len(samples[0]) == 0:
        return float("nan"), float("nan"), float("nan")
    stat = lambda *arrays, axis=-1: statistic(dict(zip(names, arrays)), axis)  # noqa: E731
    value = float(stat(*samples))
    if len(samples[0]) < 2 or all(np.all(s == s[0]) for s in samples):  # nothing varies: the interval is the point
        return value, value, value
    res = scipy_bootstrap(
        samples, stat, n_resamples=n, paired=True, vectorized=True, method="percentile", rng=np.random.default_rng(seed)
    )
    return value, float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a over paired items with a 95% bootstrap interval."""
    mean, low, high = bootstrap(
        lambda c, axis: (c["b"] - c["a"]).mean(axis=axis),
        {"a": np.asarray(a, float), "b": np.asarray(b, float)},
        n=n,
        seed=seed,
    )
    return {"mean": mean, "low": low, "high": high}


def paired_f1_difference(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], n: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Micro F1 of b minus that of a over paired rows (each side: per-row "tp", "fp", "fn" counts), with a 95% interval;
    the rows are resampled together and each resample's F1 recomputed from its summed counts.

    >>> d = paired_f1_difference({"tp": [1, 1], "fp": [0, 0], "fn": [0, 0]}, {"tp": [1, 0], "fp": [0, 0], "fn": [0, 1]})
    >>> round(d["mean"], 4)
    -0.3333
    """
    counts = ("tp", "fp", "fn")
    columns = {f"{side}{k}": np.asarray(c[k], dtype=float) for side, c in (("a", a), ("b", b)) for k in counts}

    def gain(c, axis):
        return micro_f1(*(c[f"b{k}"].sum(axis=axis) for k in counts)) - micro_f1(
            *(c[f"a{k}"].sum(axis=axis) for k in counts)
        )

    mean, low, high = bootstrap(gain, columns, n=n, seed=seed)
    return {"mean": mean, "low": low, "high": high}
