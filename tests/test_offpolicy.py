"""The off-policy estimate: a hand-checked case, a simulated bucket whose true value it must cover, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from querytune.cli import app
from querytune.evaluation.offpolicy import estimate, read_bucket


def parse(value: str) -> dict:
    return {"intent": "find_business", "slots": {"category": value}}


def row(query: str, served: str, p: float, candidates: dict[str, float], clicks: int) -> dict:
    return {
        "query": query,
        "policy": "explore",
        "propensity": p,
        "parse": json.dumps(parse(served)),
        "candidates": json.dumps([{"parse": parse(v), "p": q} for v, q in candidates.items()]),
        "clicked": [f"b{i}" for i in range(clicks)],
    }


BUCKET = pd.DataFrame(
    [
        row("a", "A", 0.5, {"A": 0.5, "B": 0.5}, 1),
        row("b", "B", 0.25, {"A": 0.5, "B": 0.25, "C": 0.25}, 0),
        row("c", "A", 0.5, {"C": 0.5, "A": 0.5}, 2),
    ]
)


def test_the_estimate_by_hand():
    m = {"a": parse("A"), "b": parse("B"), "c": parse("Z")}  # weights 2, 4, 0 (c: outside the candidates)
    n = {"a": parse("B"), "b": parse("B"), "c": parse("A")}  # weights 0, 4, 2
    ctr = estimate(BUCKET, {"m": m, "n": n, "none": {"a": None}}, "ctr")
    assert ctr["models"]["m"]["estimate"] == pytest.approx((2 * 1 + 4 * 0) / (2 + 4), abs=1e-6)
    assert ctr["models"]["m"]["support"] == pytest.approx(2 / 3, abs=1e-6)
    assert ctr["models"]["m"]["effective_n"] == pytest.approx(36 / 20, abs=0.05)
    assert ctr["models"]["n"]["estimate"] == pytest.approx((4 * 0 + 2 * 1) / 6, abs=1e-6)
    none = ctr["models"]["none"]  # no valid parse: nothing to match, nothing to judge
    assert (none["estimate"], none["support"], none["matched"]) == (0.0, 0.0, 0)
    clicks = estimate(BUCKET, {"m": m, "n": n}, "clicks")
    assert clicks["models"]["n"]["estimate"] == pytest.approx(4 / 6, abs=1e-6)
    assert clicks["models"]["n"]["vs_first"]["difference"] == pytest.approx(4 / 6 - 2 / 6, abs=1e-6)
    assert clicks["logged"] == pytest.approx(1.0)


def test_the_interval_covers_the_value_of_a_policy_that_never_served():
    """A simulated bucket: three candidates per request with known click rates; the target always picks the
    one the logging policy serves least often."""
    rng = np.random.default_rng(0)
    rate = {"A": 0.2, "B": 0.5, "C": 0.35}
    probs = {"A": 0.6, "B": 0.3, "C": 0.1}
    rows = []
    for i in range(6000):
        served = rng.choice(list(probs), p=list(probs.values()))
        rows.append(row(f"q{i}", served, probs[served], probs, int(rng.random() < rate[served])))
    target = {f"q{i}": parse("C") for i in range(6000)}
    result = estimate(pd.DataFrame(rows), {"target": target}, "ctr")["models"]["target"]
    assert result["low"] <= rate["C"] <= result["high"]
    assert result["high"] - result["low"] < 0.1


def test_a_log_without_a_bucket_is_named(tmp_path):
    path = tmp_path / "log.parquet"
    BUCKET.assign(policy="greedy").to_parquet(path)
    with pytest.raises(ValueError, match="no request in the exploration bucket"):
        read_bucket(path)
    result = CliRunner().invoke(app, ["eval", "offpolicy", "--log", str(path), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no request in the exploration bucket" in result.output
    BUCKET.drop(columns="candidates").to_parquet(path)
    result = CliRunner().invoke(app, ["eval", "offpolicy", "--log", str(path), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no column candidates" in result.output
