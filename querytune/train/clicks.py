"""Position-debiased click evidence: where users look in a result list, and how relevant each shown business is
to a query text in a city once that bias is taken out. The retrieval reward scores parses against it.

Examination. Users look at the top of a list more than its bottom, so raw clicks mostly rank what the old
ranker put first. The logging ranker randomises lightly: a few of its slots are swapped with businesses from
deeper ranks, logged with display probability `display_p` < 0.5. A swapped-in business lands in its slot
independently of its relevance, so the click-through rate of swapped-in businesses by position is proportional
to the probability that users examine that position (intervention harvesting: Joachims, Swaminathan & Schnabel,
"Unbiased Learning-to-Rank with Biased Feedback", WSDM 2017; Agarwal et al., "Estimating Position Bias without
Intrusive Interventions", WSDM 2019). `estimate_propensity` fits the power law p(i) = 1/(i+1)^eta
(p(0) = 1, i 0-based) to those counts by maximum likelihood, so that a rarely swapped position is not noise. A
log without randomised impressions (the v1 world: no `display_p`; read as all 1.0) or with fewer than
`MIN_RANDOM_CLICKS` clicks on them falls back to eta = `DEFAULT_ETA` = 1, the examination curve of Joachims et
al.'s simulations (p(i) = 1/rank). Rows of an exploration bucket (`policy` "explore", `querytune world traffic`)
are left out of the fit: a business a drawn parse shows low in the list is there because of what it is, not by
chance. Where users stop after a satisfying click (a cascade), the fitted curve is the
average examination of each position over the log, steeper than any one user's: the average is what the gains
below need.

Relevance. The debiased gain of business b for a text in a city is the inverse-propensity-scored click rate
over the n_b impressions (rows of that text in that city) where b was shown:
    gain(b) = min(1, (1 / n_b) * sum over those impressions of click / p(position)),
an estimate of the probability that b is clicked once examined (the inverse-propensity-scored click of
Joachims et al. 2017, averaged per business over its impressions). That probability cannot exceed 1: clipping
there bounds what one click far down a rarely shown list can add. Every business the log showed for the text
in that city has a gain, 0.0 when never clicked: those are the judged businesses; an unshown one has none (see
`querytune.train.reward.condensed_ndcg`).

Contexts. Each logged row of a text is a context (user city, time); `contexts_by_text` keeps up to `MAX_CONTEXTS`
of them per text, spread evenly over the text's rows in time order (not the latest only: a parse with a time
filter is judged at the hours users typed it), each holding its city's gains.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_ETA = 1.0  # examination ~ 1/rank when the log cannot tell (Joachims et al. 2017's simulation default)
MIN_RANDOM_CLICKS = 50  # clicks on swapped-in impressions needed to fit eta; below, DEFAULT_ETA
RANDOMISED_BELOW = 0.5  # display_p below this: swapped in at random (kept items are logged near 1)
MAX_CONTEXTS = 16  # contexts per text: GRPO scores every sampled parse in each of them
ETAS = np.linspace(0.0, 3.0, 1201)  # eta grid of the maximum-likelihood fit (step 0.0025)


@dataclass(frozen=True)
class Propensity:
    """Examination probability by 0-based position, p(i) = 1/(i+1)^eta, and where eta came from."""

    eta: float
    source: str  # "randomised impressions (...)" or "default (...)"

    def __call__(self, position: int) -> float:
        return float((position + 1) ** -self.eta)


def fit_eta(impressions: np.ndarray, clicks: np.ndarray) -> float:
    """Maximum-likelihood eta of p(i) = 1/(i+1)^eta from randomised impressions and their clicks per position.

    Clicks at position i are taken as Poisson with mean c * n_i * p(i), c the (unknown, position-free) click
    rate of a random swapped-in business once examined; c is profiled out (c = K / sum n_i p(i)), leaving the
    log-likelihood sum k_i log p(i) - K log sum n_i p(i), maximised on a grid.

    >>> n = np.array([0, 1000, 1000, 1000])  # position 0 never swapped: the fit needs only the ratios
    >>> fit_eta(n, np.round(0.3 * n * np.arange(1, 5) ** -0.7))
    0.7
    """
    n, k = np.asarray(impressions, dtype=float), np.asarray(clicks, dtype=float)
    logw = -np.outer(ETAS, np.log(np.arange(1, len(n) + 1)))  # log p(i) per eta (rows) and position (columns)
    ll = logw @ k - k.sum() * np.log(np.exp(logw) @ n)
    return round(float(ETAS[int(np.argmax(ll))]), 4)


def _rows(log: pd.DataFrame):
    """(shown, display_p, clicked set) per row; a log without display_p (v1) is all 1.0."""
    probs = log["display_p"] if "display_p" in log else [None] * len(log)
    for shown, p, clicked in zip(log["shown"], probs, log["clicked"]):
        shown = [] if shown is None else list(shown)
        yield shown, [1.0] * len(shown) if p is None else list(p), set([] if clicked is None else clicked)


def estimate_propensity(log: pd.DataFrame, min_clicks: int = MIN_RANDOM_CLICKS) -> Propensity:
    """The examination curve of a log (columns `shown`, `clicked`, optional `display_p`): see the module doc."""
    if "policy" in log:  # an exploration bucket's rows: what a drawn parse shows depends on relevance, not chance
        log = log[log["policy"].fillna("") != "explore"]
    depth = max((len(s) for s in log["shown"] if s is not None), default=10)
    n, k = np.zeros(max(depth, 1)), np.zeros(max(depth, 1))
    for shown, probs, clicked in _rows(log):
        for i, (b, p) in enumerate(zip(shown, probs)):
            if p < RANDOMISED_BELOW:
                n[i] += 1
                k[i] += b in clicked
    if k.sum() < min_clicks or np.count_nonzero(n) < 2:
        return Propensity(
            DEFAULT_ETA, f"default ({int(k.sum())} clicks on {int(n.sum())} randomised impressions, need {min_clicks})"
        )
    return Propensity(fit_eta(n, k), f"randomised impressions ({int(k.sum())} clicks on {int(n.sum())})")


def debiased_gains(log: pd.DataFrame, propensity: Propensity) -> dict[tuple[str, str], dict[str, float]]:
    """(text key, user city) -> {business: debiased gain} over every business shown there (module doc).
    `log` holds a `key` column (the normalised text), `user_city`, `shown`, `clicked`."""
    ipw: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    seen: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, city, (shown, _, clicked) in zip(log["key"], log["user_city"], _rows(log)):
        for i, b in enumerate(shown):
            seen[key, city][b] += 1
            ipw[key, city][b] += (b in clicked) / propensity(i)
    return {kc: {b: round(min(1.0, ipw[kc][b] / n), 5) for b, n in sorted(shown.items())} for kc, shown in seen.items()}


def spread(n: int, cap: int) -> list[int]:
    """Up to `cap` indices of `n` items in order, evenly spread (the middle of each of `cap` equal strata).

    >>> spread(3, 16), spread(10, 4)
    ([0, 1, 2], [1, 3, 6, 8])
    """
    return list(range(n)) if n <= cap else [(2 * j + 1) * n // (2 * cap) for j in range(cap)]


def contexts_by_text(
    log: pd.DataFrame, propensity: Propensity | None = None, cap: int = MAX_CONTEXTS
) -> dict[str, list[dict[str, Any]]]:
    """Text key -> its contexts, up to `cap` logged rows spread over time (`spread`), each
    `{"user_city", "timestamp" (ISO), "gains"}` with the debiased gains of the text in that city. Only rows whose
    city has a click for the text are contexts (elsewhere no parse can score). `log` holds `key` (the
    normalised text), `timestamp`, `user_city`, `shown`, `clicked`, optional `display_p`; the propensity is
    estimated from it unless given."""
    propensity = propensity or estimate_propensity(log)
    gains = debiased_gains(log, propensity)
    useful = {kc for kc, g in gains.items() if any(v > 0 for v in g.values())}
    rows: dict[str, list[tuple]] = defaultdict(list)
    for key, city, ts in zip(log["key"], log["user_city"], log["timestamp"]):
        if (key, city) in useful:
            rows[key].append((pd.Timestamp(ts), city))
    out = {}
    for key, rs in rows.items():
        rs.sort(key=lambda r: r[0])  # stable: rows at one time keep log order
        out[key] = [
            {"user_city": city, "timestamp": ts.isoformat(), "gains": gains[key, city]}
            for ts, city in (rs[i] for i in spread(len(rs), cap))
        ]
    return out
