"""Before a new model replaces the served one: which logged queries change parse, weighted by traffic, and what
the change does to retrieval.

    querytune eval diff --a models/sft --b models/grpo --log world/log.parquet --index index [--top 2000]

A and B are model folders (the `--top` most typed distinct queries of the log are parsed by each) or labeling
folders of `querytune label` (their labels are compared as they are, on the queries both hold). Queries are
compared after the labeler's normalisation (`log_input.check_query`, the cache's key), so "Thai  food" and "thai food"
are one query with their traffic summed. With `--index` and a log that has clicks (`clicked`, a list of business ids;
`shown` and `display_p` where the log records them), each changed query's retrieval effect is the retrieval-success
reward of each parse, as in training: NDCG@10 of its structured search against the position-debiased clicks, over up to
16 of the query's logged contexts (`clicks.contexts_by_text`, `reward.score_in_contexts`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from querytune.query import check_query


def read_log(path: str | Path, column: str = "query") -> pd.DataFrame:
    path = Path(path)
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if path.suffix not in readers:
        raise ValueError(f"{path}: expected .parquet, .csv or .jsonl")
    log = readers[path.suffix](path)
    if column not in log:
        raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(map(str, log.columns))})")
    log["normalized"] = log[column].map(lambda v: check_query(v)[0] or "")  # the labeler's and the cache's key
    return log[log["normalized"] != ""]


def is_label_folder(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "labels").is_dir()


def parses_of(
    source: Path, queries: list[str], progress: Callable[[int], None] | None = None, batch_size: int = 32
) -> tuple[dict[str, dict | None], str]:
    """normalised query -> canonical parse (None: invalid) from a model folder or a labeling folder, and a name."""
    if is_label_folder(source):
        from querytune.labeling.label import read_labels

        labels = read_labels(source)
        return {
            r.normalized: json.loads(r.parse) if r.valid and r.parse else None for r in labels.itertuples()
        }, f"labels {source}"
    from querytune.runtime.backends import TransformersBackend

    backend = TransformersBackend(source, batch_size=batch_size)
    out: dict[str, dict | None] = {}
    for i in range(0, len(queries), 256):
        chunk = queries[i : i + 256]
        for q, p in zip(chunk, backend.parse(chunk)):
            out[q] = p.parse if p.valid else None
        if progress:
            progress(len(chunk))
    return out, f"model {source} ({backend.model_version})"


def slot_changes(a: dict | None, b: dict | None) -> str:
    """A short human reading of what changed between two parses."""
    if a is None or b is None:
        return (
            "invalid -> valid"
            if a is None and b is not None
            else "valid -> invalid"
            if b is None and a is not None
            else "both invalid"
        )
    parts = [f"intent {a['intent']} -> {b['intent']}"] if a["intent"] != b["intent"] else []
    for k in sorted(set(a["slots"]) | set(b["slots"])):
        va, vb = a["slots"].get(k), b["slots"].get(k)
        if va != vb:
            parts.append(f"-{k}={va}" if vb is None else f"+{k}={vb}" if va is None else f"{k}: {va} -> {vb}")
    return ", ".join(parts)


def diff(
    a: Path,
    b: Path,
    log_path: Path,
    index: Path | None = None,
    top: int = 2000,
    column: str = "query",
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
    """The traffic-weighted parse changes from A to B on the log (see the module doc)."""
    log = read_log(log_path, column)
    traffic = Counter(log["normalized"])
    total = sum(traffic.values())
    head = [q for q, _ in traffic.most_common(top)]
    pa, name_a = parses_of(a, head, progress("parsing with A", len(head)) if progress else None)
    pb, name_b = parses_of(b, head, progress("parsing with B", len(head)) if progress else None)
    compared = [
        q for q in (head if not (is_label_folder(a) and is_label_folder(b)) else list(traffic)) if q in pa and q in pb
    ]
    changed = [q for q in compared if json.dumps(pa[q], sort_keys=True) != json.dumps(pb[q], sort_keys=True)]
    effect = _retrieval_effect(changed, pa, pb, log, index, a, b) if index else {}
    rows = sorted(
        (
            {
                "query": q,
                "rows": traffic[q],
                "traffic_share": round(traffic[q] / total, 6),
                "a": pa[q],
                "b": pb[q],
                "change": slot_changes(pa[q], pb[q]),
                **effect.get(q, {}),
            }
            for q in changed
        ),
        key=lambda r: (-r["rows"], r["query"]),
    )
    compared_rows = sum(traffic[q] for q in compared)
    changed_rows = sum(r["rows"] for r in rows)
    summary = {
        "a": name_a,
        "b": name_b,
        "log": str(log_path),
        "log_rows": total,
        "distinct_queries": len(traffic),
        "compared_queries": len(compared),
        "compared_traffic_share": round(compared_rows / total, 4),
        "changed_queries": len(rows),
        "changed_traffic_share": round(changed_rows / total, 4),
    }
    scored = [r for r in rows if "reward_a" in r]
    if scored:
        weight = sum(r["rows"] for r in scored)
        summary |= {
            "changed_scored": len(scored),
            "reward_a_weighted": round(sum(r["rows"] * r["reward_a"] for r in scored) / weight, 4),
            "reward_b_weighted": round(sum(r["rows"] * r["reward_b"] for r in scored) / weight, 4),
            "better": sum(r["reward_b"] > r["reward_a"] for r in scored),
            "worse": sum(r["reward_b"] < r["reward_a"] for r in scored),
        }
        summary["reward_change_on_changed"] = round(summary["reward_b_weighted"] - summary["reward_a_weighted"], 4)
        # what the change does to the whole compared traffic: unchanged queries keep their reward
        summary["reward_change_on_compared_traffic"] = round(
            summary["reward_change_on_changed"] * weight / compared_rows, 5
        )
    return {"summary": summary, "changed": rows}


def _retrieval_effect(
    changed: list[str], pa: dict, pb: dict, log: pd.DataFrame, index: Path, a: Path, b: Path
) -> dict[str, dict]:
    """Each changed query's retrieval-success reward under parse A and parse B, over its logged contexts with clicks."""
    if not {"clicked", "user_city", "timestamp"} <= set(log.columns) or not changed:
        return {}
    if "shown" not in log:  # a log of clicks alone: only the clicked businesses are judged, none debiased
        log = log.assign(shown=log["clicked"])
    from querytune.runtime.model import ModelFolder
    from querytune.schema_file import load_schema
    from querytune.search import Searcher
    from querytune.train.clicks import contexts_by_text, estimate_propensity
    from querytune.train.reward import RetrievalReward, score_in_contexts

    folder = next((p for p in (a, b) if not is_label_folder(p)), None)
    schema = ModelFolder.open(folder).schema if folder else load_schema()  # labeling folders: the default schema
    reward = RetrievalReward(Searcher(index, schema), schema)
    propensity = estimate_propensity(log)  # the whole log's randomised impressions
    contexts = contexts_by_text(
        log[log["normalized"].isin(set(changed))].assign(key=lambda d: d["normalized"]), propensity
    )
    out = {}
    for q in changed:
        if not contexts.get(q):
            continue
        scores = [score_in_contexts(reward.score, q, json.dumps(p) if p else "", contexts[q]) for p in (pa[q], pb[q])]
        out[q] = {"reward_a": scores[0], "reward_b": scores[1], "contexts": len(contexts[q])}
    return out
