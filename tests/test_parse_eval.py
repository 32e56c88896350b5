from __future__ import annotations

import pytest

from querytune.evaluation.parse_eval import parse_metrics


def test_hand_made_cases():
    golds = [
        {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai", "near_me": True}},
        {"intent": "find_business", "slots": {"category": "plumber", "open": "24h"}},
        {"intent": "out_of_scope", "slots": {}},
        {"intent": "book", "slots": {"category": "dentist", "party_size": 2}},
    ]
    preds = [
        {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai", "near_me": True}},  # exact
        {"intent": "find_business", "slots": {"category": "plumber", "open": "now"}},  # one wrong value
        None,  # invalid output
        {
            "intent": "find_business",
            "slots": {"category": "dentist", "party_size": 2.0, "city": "austin"},
        },  # wrong intent, extra slot
    ]
    m = parse_metrics(golds, preds)
    # pairs: gold 3+2+0+2 = 7; pred 3+2+0+3 = 8; tp = 3 + 1 + 0 + 2 = 6
    assert m["slot_precision"] == pytest.approx(6 / 8, abs=1e-4)
    assert m["slot_recall"] == pytest.approx(6 / 7, abs=1e-4)
    p, r = 6 / 8, 6 / 7
    assert m["slot_f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-4)
    assert m["intent_accuracy"] == 0.5 and m["frame_exact_match"] == 0.25 and m["validity"] == 0.75
    assert m["per_intent"]["out_of_scope"] == {"n": 1, "intent_accuracy": 0.0, "frame_exact_match": 0.0}
    assert m["per_slot"]["open"] == {"support": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert m["per_slot"]["category"]["f1"] == 1.0


def test_values_compare_after_normalisation_only():
    gold = [{"intent": "a", "slots": {"name": "Joe's  Pizza"}}]
    assert parse_metrics(gold, [{"intent": "a", "slots": {"name": "joe's pizza"}}])["frame_exact_match"] == 1.0
    assert parse_metrics(gold, [{"intent": "a", "slots": {"name": "joes pizza"}}])["frame_exact_match"] == 0.0


def test_lengths_must_match():
    with pytest.raises(ValueError):
        parse_metrics([{"intent": "a", "slots": {}}], [])
