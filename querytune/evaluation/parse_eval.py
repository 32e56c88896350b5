"""Parse metrics: intent accuracy, slot precision/recall/F1 (micro over (slot, value) pairs), whole-frame
exact match and validity, with per-intent and per-slot tables.

    querytune eval parse --model runs/sft --data runs/world/test.jsonl --out runs/sft/parse_test.json

Values are compared after the schema's canonicalisation and NFKC + lower case + collapsed whitespace,
nothing fuzzier. An invalid prediction counts as wrong intent, no slots and no frame match.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from querytune.metrics import micro_f1, paired_bootstrap, paired_f1_difference
from querytune.schema import normalize_text


def _value(v: Any) -> str:
    if isinstance(v, str):
        return normalize_text(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer():
        return str(int(v))  # 2 and 2.0 are the same number
    return json.dumps(v)


def slot_pairs(slots: dict[str, Any]) -> set[tuple[str, str]]:
    return {(k, _value(v)) for k, v in slots.items()}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(float(micro_f1(tp, fp, fn)), 4)}


def parse_metrics(golds: list[dict[str, Any]], preds: list[dict[str, Any] | None]) -> dict[str, Any]:
    """`golds`: canonical {"intent", "slots"}; `preds`: canonical parses, None where the output was invalid.

    >>> m = parse_metrics([{"intent": "a", "slots": {"x": "Thai"}}],
    ...                   [{"intent": "a", "slots": {"x": "thai", "y": True}}])
    >>> m["intent_accuracy"], m["slot_precision"], m["slot_recall"], m["frame_exact_match"]
    (1.0, 0.5, 1.0, 0.0)
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold rows but {len(preds)} predictions")
    tp = fp = fn = intent_ok = frame_ok = valid = 0
    per_slot: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    per_intent: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, intent ok, frame ok
    for gold, pred in zip(golds, preds):
        g = slot_pairs(gold["slots"])
        p = slot_pairs(pred["slots"]) if pred else set()
        valid += pred is not None
        i_ok = bool(pred) and pred["intent"] == gold["intent"]
        f_ok = i_ok and g == p
        intent_ok += i_ok
        frame_ok += f_ok
        stats = per_intent[gold["intent"]]
        stats[0] += 1
        stats[1] += i_ok
        stats[2] += f_ok
        tp += len(g & p)
        fp += len(p - g)
        fn += len(g - p)
        for k, _ in g & p:
            per_slot[k][0] += 1
        for k, _ in p - g:
            per_slot[k][1] += 1
        for k, _ in g - p:
            per_slot[k][2] += 1
    n = len(golds)
    slot = _prf(tp, fp, fn)
    return {
        "n": n,
        "intent_accuracy": round(intent_ok / n, 4) if n else 0.0,
        "slot_precision": slot["precision"],
        "slot_recall": slot["recall"],
        "slot_f1": slot["f1"],
        "frame_exact_match": round(frame_ok / n, 4) if n else 0.0,
        "validity": round(valid / n, 4) if n else 0.0,
        "per_intent": {
            k: {"n": v[0], "intent_accuracy": round(v[1] / v[0], 4), "frame_exact_match": round(v[2] / v[0], 4)}
            for k, v in sorted(per_intent.items())
        },
        "per_slot": {k: {"support": v[0] + v[2], **_prf(*v)} for k, v in sorted(per_slot.items())},
    }


def ungrounded_share(texts: list[str], preds: list[dict[str, Any] | None], schema) -> float:
    """Share of predicted free-text slot values (in the default schema: business names) that do not occur in
    their query after normalisation: values the model made up (or took from what users clicked) rather than read.

    >>> from querytune.schema_file import load_schema
    >>> ungrounded_share(["joe's pizza soho", "pizza"],
    ...                  [{"intent": "find_named_business",
    ...                    "slots": {"business_name": "joe's pizza", "neighborhood": "soho"}},
    ...                   {"intent": "find_named_business", "slots": {"business_name": "tony's"}}], load_schema())
    0.5
    """
    from querytune.schema import normalize_text

    text_slots = {s.name for s in schema.slots.values() if s.type == "text"}
    total = missing = 0
    for text, pred in zip(texts, preds, strict=True):
        for name, value in (pred or {}).get("slots", {}).items():
            if name in text_slots:
                total += 1
                missing += normalize_text(str(value)) not in normalize_text(text)
    return round(missing / total, 4) if total else 0.0


def grounding_dropped(preds, schema) -> dict[str, float]:
    """How many values of the schema's grounded slots the model wrote that its query does not (dropped by
    the parser, see `Schema.ground`), and their share of all grounded-slot values it wrote."""
    grounded = {s.name for s in schema.slots.values() if s.grounded}
    dropped = sum(len(p.ungrounded or {}) for p in preds)
    kept = sum(k in grounded for p in preds if p.parse for k in p.parse["slots"])
    return {"values": dropped, "share": round(dropped / (dropped + kept), 4) if dropped + kept else 0.0}


def parse_scores(gold: dict, pred: dict | None) -> dict[str, float]:
    """One row's parse outcome: intent right, frame right, valid, and its slot true/false positives/negatives."""
    g, p = slot_pairs(gold["slots"]), slot_pairs(pred["slots"]) if pred else set()
    intent_ok = bool(pred) and pred["intent"] == gold["intent"]
    return {
        "intent_accuracy": float(intent_ok),
        "frame_exact_match": float(intent_ok and g == p),
        "validity": float(pred is not None),
        "tp": float(len(g & p)),
        "fp": float(len(p - g)),
        "fn": float(len(g - p)),
    }


def paired_parse_difference(
    golds: list[dict[str, Any]],
    preds_a: list[dict[str, Any] | None],
    preds_b: list[dict[str, Any] | None],
    n: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """B - A in intent accuracy and slot F1 on the same rows, each with a 95% paired bootstrap interval (rows resampled
    together; micro slot F1 recomputed from each resample's counts).

    >>> g = [{"intent": "a", "slots": {"x": 1}}] * 4
    >>> d = paired_parse_difference(g, g, [g[0], g[0], None, g[0]])
    >>> d["intent_accuracy"]["mean"], d["slot_f1"]["mean"]
    (-0.25, -0.1429)
    """
    a, b = (
        {
            k: [parse_scores(g, p)[k] for g, p in zip(golds, preds, strict=True)]
            for k in ("intent_accuracy", "tp", "fp", "fn")
        }
        for preds in (preds_a, preds_b)
    )
    intent = paired_bootstrap(a["intent_accuracy"], b["intent_accuracy"], n=n, seed=seed)
    slot = paired_f1_difference(a, b, n=n, seed=seed)
    return {
        "intent_accuracy": {k: round(v, 4) for k, v in intent.items()},
        "slot_f1": {k: round(v, 4) for k, v in slot.items()},
    }
