from __future__ import annotations

import math

import pytest

from querytune.metrics import mrr, ndcg_at_k, paired_bootstrap, ranking_metrics, recall_at_k


def test_ndcg_by_hand():
    rel = {"a": 2, "b": 1, "c": 2}
    # ranked b, x, a: gains 1, 0, 3 ; ideal a, c, b: 3, 3, 1
    dcg = 1 / math.log2(2) + 0 + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(["b", "x", "a"], rel, k=10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "c", "b"], rel) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], rel) == 0.0
    assert ndcg_at_k(["a"], {}) == 0.0
    # the cut-off: a relevant result at rank 3 does not count at k=2
    assert ndcg_at_k(["x", "y", "a"], rel, k=2) == 0.0


def test_recall_is_capped_and_counts_satisfying_results_only():
    rel = {f"s{i}": 2 for i in range(20)} | {"near": 1}
    assert recall_at_k([f"s{i}" for i in range(10)], rel, k=10) == 1.0
    assert recall_at_k(["near", "s1"], {"near": 1, "s1": 2, "s2": 2}, k=10) == 0.5
    assert recall_at_k(["x"], {"near": 1}) == 0.0


def test_mrr():
    assert mrr(["near", "x", "hit"], {"near": 1, "hit": 2}) == pytest.approx(1 / 3)
    assert mrr(["x"], {"hit": 2}) == 0.0
    assert ranking_metrics(["hit"], {"hit": 2}) == {"ndcg@10": 1.0, "recall@10": 1.0, "mrr": 1.0}


def test_paired_bootstrap_excludes_zero_only_for_a_real_gain():
    a = [0.5] * 200
    better = paired_bootstrap(a, [0.6] * 100 + [0.55] * 100)
    assert better["low"] > 0 and better["mean"] == pytest.approx(0.075)
    noise = paired_bootstrap(a, [0.6, 0.4] * 100)
    assert noise["low"] < 0 < noise["high"]


def test_ranking_metrics_agree_with_ir_measures_on_random_runs():
    """NDCG@10 (gains 2^grade - 1), MRR and Recall@10 (counting grade 2) against trec_eval's, through ir-measures."""
    import random

    import ir_measures
    from ir_measures import RR, R, nDCG

    rng = random.Random(0)
    qrels, run, ours = [], [], {}
    for q in range(60):
        docs = [f"d{i}" for i in range(rng.randint(3, 30))]
        relevance = {d: rng.choice([0, 0, 1, 2]) for d in rng.sample(docs, rng.randint(1, len(docs)))}
        ranked = rng.sample(docs, min(len(docs), rng.randint(1, 20)))
        qrels += [ir_measures.Qrel(f"q{q}", d, g) for d, g in relevance.items()]
        run += [ir_measures.ScoredDoc(f"q{q}", d, float(len(ranked) - i)) for i, d in enumerate(ranked)]
        ours[f"q{q}"] = (ranking_metrics(ranked, relevance), sum(g == 2 for g in relevance.values()))
    ndcg, rr, recall = nDCG(gains={0: 0, 1: 1, 2: 3}) @ 10, RR(rel=2), R(rel=2) @ 10
    theirs = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc([ndcg, rr, recall], qrels, run)}
    for q, (m, satisfying) in ours.items():
        assert m["ndcg@10"] == pytest.approx(theirs.get((q, str(ndcg)), 0.0), abs=1e-4)
        assert m["mrr"] == pytest.approx(theirs.get((q, str(rr)), 0.0), abs=1e-4)
        # ours is capped (hits / min(10, R)); trec_eval's is hits / R
        assert m["recall@10"] == pytest.approx(
            theirs.get((q, str(recall)), 0.0) * satisfying / max(min(10, satisfying), 1), abs=1e-4
        )
