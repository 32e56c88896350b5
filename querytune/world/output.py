"""What a world's folder holds beside the simulation itself: the seed's random label errors, the figures of
stats.json (every profile's, and v2's mechanism shares and logging-ranker NDCG), and the Parquet/JSONL writers.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from querytune.metrics import ndcg_at_k
from querytune.world.mechanisms import FINE_TO_BROAD, MECHANISMS, SWAP_P, TEST_SHARES

SEED_ERROR_RATE = 0.07


def v2_stats(prof, catalog, log_df, audit_df, rels, shown_lists, tags_of, eval_sets, generic, ids) -> dict:
    """What world make prints beside the issue's requirements: mechanism shares, the logging ranker's NDCG@10,
    and that every neighbourhood-only need was typed where that neighbourhood is."""
    hoods = {(c, h) for c, h in zip(catalog["city"], catalog["neighborhood"])}
    hood_only = [(json.loads(s), c) for s, c in zip(audit_df["slots"], log_df["user_city"])]
    hood_only = [(s, c) for s, c in hood_only if "neighborhood" in s and "city" not in s]
    gradable = [j for j, rel in enumerate(rels) if 2 in rel.values()]
    ndcg = [
        ndcg_at_k([str(ids[b]) for b in shown_lists[j]], {str(ids[b]): g for b, g in rels[j].items()}) for j in gradable
    ]
    n_shown = sum(len(p) for p in log_df["display_p"])
    seed_diff = sum(
        json.loads(a) != {"intent": i, "slots": json.loads(s)}
        for a, i, s in zip(audit_df["annotation"], audit_df["intent"], audit_df["slots"])
    )
    fine = catalog["cuisine"].isin(list(FINE_TO_BROAD))
    return {
        "profile": prof.name,
        "mechanisms": {
            "required_test_share": TEST_SHARES,
            "log_share": {m: round(sum(m in t for t in tags_of) / len(tags_of), 4) for m in MECHANISMS},
            **{
                name: {m: round(sum(m in r["mechanisms"] for r in rows) / max(1, len(rows)), 4) for m in MECHANISMS}
                for name, rows in eval_sets.items()
            },
            "log_share_annotation_differs": round(seed_diff / len(audit_df), 4),
        },
        "catalog_v2": {
            "restaurants_with_fine_cuisine": int(fine.sum()),
            "restaurants": int(catalog["cuisine"].notna().sum()),
            "generic_names": len(generic),
        },
        "ranker": {
            "ndcg10": round(float(np.mean(ndcg)), 4),
            "gradable_rows": len(gradable),
            "share_impressions_randomised": round(
                sum(p < 1 - SWAP_P for ps in log_df["display_p"] for p in ps) / max(1, n_shown), 4
            ),
        },
        "neighborhood_only": {
            "rows": len(hood_only),
            "unsatisfiable": sum((c, s["neighborhood"]) not in hoods for s, c in hood_only),
        },
    }


def corrupt_labels(rng: random.Random, rows: list[dict], schema, allowed: dict[str, set] | None = None) -> list[dict]:
    """Give SEED_ERROR_RATE of rows, chosen independently of their text, one random label error. `allowed`: per
    slot, the values a wrong value is drawn from (v1 keeps to the values its schema had)."""
    intents = list(schema.intents)
    errors = []
    for row in rows:
        if rng.random() >= SEED_ERROR_RATE:
            continue
        true = {"intent": row["intent"], "slots": dict(row["slots"])}
        kind = rng.choice(["intent", "drop_slot", "value", "extra_slot"])
        if kind == "drop_slot" and row["slots"]:
            row["slots"].pop(rng.choice(sorted(row["slots"])))
        elif kind == "value" and any(schema.slots[k].type == "categorical" for k in row["slots"]):
            k = rng.choice(sorted(k for k in row["slots"] if schema.slots[k].type == "categorical"))
            row["slots"][k] = rng.choice(
                [
                    v
                    for v in schema.slots[k].values
                    if v != row["slots"][k] and (not allowed or k not in allowed or v in allowed[k])
                ]
            )
        elif (
            kind == "extra_slot"
            and row["intent"] != "out_of_scope"
            and (
                extra := [
                    k for k in ("near_me", "kid_friendly", "delivery", "outdoor_seating") if k not in row["slots"]
                ]
            )
        ):
            row["slots"][rng.choice(extra)] = True
        else:
            kind = "intent"
            row["intent"] = rng.choice([i for i in intents if i != row["intent"]])
            if row["intent"] == "out_of_scope":
                row["slots"] = {}
        row["slots"] = dict(sorted(row["slots"].items()))
        errors.append(
            {"id": row["id"], "kind": kind, "true": true, "given": {"intent": row["intent"], "slots": row["slots"]}}
        )
    return errors


def world_stats(catalog, log_df, audit_df, rels, seed_rows, errors, eval_sets, freq, ids) -> dict:
    clicks = [(c, rels[j]) for j, cs in enumerate(log_df["clicked"]) for c in cs]
    id_to_row = {b: i for i, b in enumerate(ids)}
    unsatisfying = sum(r.get(id_to_row[c], 0) < 2 for c, r in clicks)
    top = freq.iloc[: max(1, len(freq) // 100)].sum()
    stat = lambda rows, key: round(float(np.mean([r[key] for r in rows])), 4)  # noqa: E731
    return {
        "catalog": {
            "businesses": len(catalog),
            "cities": catalog["city"].nunique(),
            "neighborhoods": int(catalog[["city", "neighborhood"]].drop_duplicates().shape[0]),
            "categories": catalog["category"].nunique(),
            "cuisines": catalog["cuisine"].nunique(),
        },
        "log": {
            "rows": len(log_df),
            "distinct_queries": int(len(freq)),
            "share_rows_seen_once": round(float((freq == 1).sum() / len(log_df)), 4),
            "share_traffic_top1pct_queries": round(float(top / len(log_df)), 4),
            "clicks": len(clicks),
            "share_clicks_not_satisfying": round(unsatisfying / max(1, len(clicks)), 4),
            "rows_early": int((log_df["period"] == "early").sum()),
            "rows_late": int((log_df["period"] == "late").sum()),
            "intents": {k: int(v) for k, v in audit_df["intent"].value_counts().sort_index().items()},
            "share_phrasing_in_seed_style": round(float(audit_df["phrasing_in_seed"].mean()), 4),
        },
        "seed": {
            "rows": len(seed_rows),
            "label_errors": len(errors),
            "label_error_rate": round(len(errors) / max(1, len(seed_rows)), 4),
        },
        **{
            name: {
                "rows": len(rows),
                "share_seen_in_early_log": stat(rows, "seen_in_early_log"),
                "share_phrasing_in_seed": stat(rows, "phrasing_in_seed"),
                "traffic": dict(sorted(Counter(r["traffic"] for r in rows).items())),
                "effects": dict(sorted(Counter(e for r in rows for e in r["effects"]).items())),
            }
            for name, rows in eval_sets.items()
        },
    }


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, compression="zstd")


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")
