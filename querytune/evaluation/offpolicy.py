"""Off-policy evaluation from the exploration bucket: the clicks a model's parses would have earned on the bucket's
requests, estimated from the answers the bucket drew and their logged probabilities, before the model serves.

    querytune eval offpolicy --log LOG --model round1=M1 --model round2=M2 [--metric ctr|clicks]

The estimator is self-normalised inverse propensity scoring (SNIPS; Swaminathan & Joachims, NeurIPS 2015): over
the bucket's requests i, served parse a_i drawn with probability p_i, click reward r_i, a model whose greedy parse of
the text is m_i scores sum_i w_i r_i / sum_i w_i with w_i = [m_i = a_i] / p_i. The search is a function of the parse
and the request, so where the model's parse is the one served the page and its clicks are the ones the model would
have got. Reward: `ctr`, 1 when the request got a click; `clicks`, how many. Interval: 95% bootstrap over requests
(`querytune.metrics.bootstrap`). Support: the share of requests whose model parse was among the logged candidates;
outside it the bucket cannot judge the model, and the estimate stands on the rows inside. With several models each
is also compared with the first on the same requests (the difference, paired).

A log is the bucket's part of `querytune world traffic`'s log.parquet (or any log with its columns: `query`,
`policy`, `propensity`, `parse`, `candidates`, `clicked`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from querytune.metrics import bootstrap
from querytune.schema import normalize_text
from querytune.serving.explore import canonical

METRICS = ("ctr", "clicks")
COLUMNS = ("query", "policy", "propensity", "parse", "candidates", "clicked")


def read_bucket(path: str | Path) -> pd.DataFrame:
    """The bucket's rows of a log (parquet or JSONL), with a clear error for a log that lacks a column or a bucket."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--log {path}: file not found")
    log = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    missing = [c for c in COLUMNS if c not in log.columns]
    if missing:
        raise ValueError(f"--log {path}: no column {', '.join(missing)} (a log from `querytune world traffic`)")
    bucket = log[log["policy"] == "explore"].reset_index(drop=True)
    if bucket.empty:
        raise ValueError(f"--log {path}: no request in the exploration bucket (logged with --explore-share > 0?)")
    return bucket


def snips(columns: dict[str, np.ndarray], axis: int = -1, w: str = "w") -> np.ndarray:
    """sum(w r) / sum(w) along `axis` (0 where no weight)."""
    total = columns[w].sum(axis=axis)
    return np.where(total > 0, (columns[w] * columns["r"]).sum(axis=axis) / np.where(total > 0, total, 1), 0.0)


def reward(bucket: pd.DataFrame, metric: str) -> np.ndarray:
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: one of {', '.join(METRICS)}")
    n = bucket["clicked"].map(len).to_numpy(dtype=float)
    return (n > 0).astype(float) if metric == "ctr" else n


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def weights(bucket: pd.DataFrame, parses: dict[str, dict[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each request's importance weight for a model whose parse of each normalised text is `parses[text]`, and
    whether that parse was a candidate at all (the support)."""
    w, support = np.zeros(len(bucket)), np.zeros(len(bucket), dtype=bool)
    for i, r in enumerate(bucket.itertuples(index=False)):
        mine = parses.get(normalize_text(r.query))
        if mine is None:
            continue
        key = canonical(mine)
        support[i] = any(canonical(c["parse"]) == key for c in _json(r.candidates))
        if r.parse is not None and canonical(_json(r.parse)) == key:
            w[i] = 1.0 / float(r.propensity)
    return w, support


def estimate(bucket: pd.DataFrame, models: dict[str, dict[str, dict | None]], metric: str = "ctr") -> dict[str, Any]:
    """Each model's SNIPS estimate with its interval, support and effective sample size; with two or more, each
    one's difference from the first. `models`: name -> normalised text -> greedy parse (None: invalid)."""
    r = reward(bucket, metric)
    out: dict[str, Any] = {"metric": metric, "requests": len(bucket), "logged": float(r.mean()), "models": {}}
    ws = {}
    for name, parses in models.items():
        w, support = weights(bucket, parses)
        ws[name] = w
        value, low, high = bootstrap(snips, {"w": w, "r": r})
        out["models"][name] = {
            "estimate": round(value, 6),
            "low": round(low, 6),
            "high": round(high, 6),
            "support": round(float(support.mean()), 6),
            "matched": int((w > 0).sum()),
            "effective_n": round(float(w.sum() ** 2 / (w**2).sum()), 1) if w.any() else 0.0,
        }
    names = list(models)
    for name in names[1:]:
        value, low, high = bootstrap(
            lambda c, axis: snips(c, axis, "b") - snips(c, axis, "a"), {"a": ws[names[0]], "b": ws[name], "r": r}
        )
        out["models"][name]["vs_first"] = {"difference": round(value, 6), "low": round(low, 6), "high": round(high, 6)}
    return out


def logged_greedy(bucket: pd.DataFrame, model_version: str) -> dict[str, dict[str, Any]] | None:
    """The greedy parse of each normalised text of a bucket served by the model `model_version` names (that version on
    every row), read from the log: a bucket row's first candidate is the serving model's greedy parse (only valid
    greedy parses explore). None where another model served it."""
    if "model_version" not in bucket or set(bucket["model_version"]) != {model_version}:
        return None
    return {normalize_text(r.query): _json(r.candidates)[0]["parse"] for r in bucket.itertuples(index=False)}


def model_parses(backend, bucket: pd.DataFrame, progress=None) -> dict[str, dict | None]:
    """A model's greedy parse of each distinct normalised text of the bucket: read from the log where this very model
    served it (`logged_greedy`), else decoded."""
    from querytune.runtime.backends import parse_many

    texts = list(dict.fromkeys(normalize_text(q) for q in bucket["query"]))
    logged = logged_greedy(bucket, backend.model_version)
    if logged is not None:
        if progress:
            progress(len(texts))
        return {t: logged[t] for t in texts}
    return {t: p.parse if p.valid else None for t, p in parse_many(backend, texts, progress).items()}
