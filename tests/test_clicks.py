"""Position-debiased click evidence on simulated logs whose click model is known."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from querytune.train.clicks import DEFAULT_ETA, Propensity, contexts_by_text, debiased_gains, estimate_propensity

EPS, POOL = 0.05, 20  # the simulated ranker: each slot swapped with probability EPS for one of POOL deeper businesses


def simulated_log(eta: float, rows: int, seed: int = 0, randomise: bool = True) -> pd.DataFrame:
    """One text in one city. The ranker shows k0..k9 (relevance falling with rank, so raw clicks by position
    confound relevance with examination) and swaps each slot with probability EPS for a random deeper business
    (relevance 0.3, whatever the slot); users examine position i with probability 1/(i+1)^eta and click an
    examined business with probability its relevance."""
    rng = np.random.default_rng(seed)
    kept_rel = np.linspace(0.9, 0.4, 10)
    out = []
    for r in range(rows):
        shown, probs, clicked = [], [], []
        for i in range(10):
            swap = randomise and rng.random() < EPS
            b, rel = (f"d{rng.integers(POOL)}", 0.3) if swap else (f"k{i}", kept_rel[i])
            shown.append(b)
            probs.append(EPS / POOL if swap else 1 - EPS)
            if rng.random() < (i + 1) ** -eta and rng.random() < rel:
                clicked.append(b)
        out.append(
            {
                "key": "thai food",
                "user_city": "austin",
                "timestamp": datetime(2026, 9, 1) + timedelta(minutes=r),
                "shown": shown,
                "display_p": probs,
                "clicked": clicked,
            }
        )
    return pd.DataFrame(out)


@pytest.mark.parametrize("eta", [0.5, 0.8, 1.2])
def test_the_examination_curve_is_recovered_from_randomised_impressions(eta):
    log = simulated_log(eta, 20_000)
    got = estimate_propensity(log)
    assert got.source.startswith("randomised") and got.eta == pytest.approx(eta, abs=0.1)
    # the kept businesses alone would mislead: their clicks fall with rank for relevance as well as examination
    kept = log.assign(display_p=[[1.0] * 10] * len(log))
    assert estimate_propensity(kept).eta == DEFAULT_ETA


def test_a_log_without_display_p_falls_back_to_the_default_curve():
    log = simulated_log(0.8, 500).drop(columns="display_p")  # a v1 log
    p = estimate_propensity(log)
    assert p.eta == DEFAULT_ETA and p.source.startswith("default") and p(0) == 1.0 and p(1) == 0.5
    assert contexts_by_text(log)["thai food"]  # and it still yields contexts with gains


def test_hand_checked_gain():
    """Business b shown 10 times at position 2, clicked 3 times, where p(2) = 0.5: (3 / 0.5) / 10 = 0.6."""
    p = Propensity(math.log(2) / math.log(3), "hand")
    assert p(2) == pytest.approx(0.5)
    log = pd.DataFrame(
        [
            {"key": "t", "user_city": "austin", "shown": ["x", "y", "b"], "clicked": ["b"] if r < 3 else []}
            for r in range(10)
        ]
    )
    gains = debiased_gains(log, p)[("t", "austin")]
    assert gains == {"b": pytest.approx(0.6), "x": 0.0, "y": 0.0}  # shown and never clicked: judged, gain 0


def test_debiased_gains_undo_the_position_bias():
    """On the simulated log the debiased gains of the kept businesses estimate their true relevance, which raw
    click rates understate more the lower they were shown."""
    log = simulated_log(0.8, 20_000, randomise=False)
    gains = debiased_gains(log, Propensity(0.8, "known"))[("thai food", "austin")]
    assert [gains[f"k{i}"] for i in range(10)] == pytest.approx(list(np.linspace(0.9, 0.4, 10)), abs=0.05)


def test_contexts_are_capped_spread_over_time_and_only_where_a_click_is():
    rows = [
        {
            "key": "t",
            "user_city": "austin",
            "timestamp": datetime(2026, 9, 1) + timedelta(hours=h),
            "shown": ["a", "b"],
            "clicked": ["a"] if h == 0 else [],
        }
        for h in range(40)
    ]
    rows += [
        {"key": "t", "user_city": "boston", "timestamp": datetime(2026, 9, 1), "shown": ["c"], "clicked": []}
    ]  # no click there
    contexts = contexts_by_text(pd.DataFrame(rows), Propensity(1.0, "test"), cap=4)["t"]
    assert [c["timestamp"] for c in contexts] == [f"2026-09-01T{h:02d}:00:00" for h in (5, 15)] + [
        "2026-09-02T01:00:00",
        "2026-09-02T11:00:00",
    ]
    assert {c["user_city"] for c in contexts} == {"austin"}
    assert contexts[0]["gains"] == {"a": pytest.approx(1 / 40), "b": 0.0}
