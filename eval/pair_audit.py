"""Are the preference pairs right? A check of a DPO pair file against the world's hidden needs.

Each pair says "for this logged query, the chosen parse retrieved the clicks better than the rejected one".
The world's audit holds the hidden need behind every logged query: the true parse. A pair agrees with the
truth when its chosen parse is closer to the true one (slot F1, the intent counted as a slot) and disagrees
when it is farther. Prints the agreement by kind of pair (rejecting the greedy parse or a sample; differing
in the intent, in the "what"/"where" slots, or only in narrowing filters; the chosen parse only dropping
slots), whether `tells_apart` keeps it, then one JSON line.

    python eval/pair_audit.py --pairs runs/dpo/pairs.parquet --world runs/world [--schema data/schema.yaml]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pandas as pd

from querytune.schema import normalize_text
from querytune.schema_file import load_schema
from querytune.train.pair_rules import pair_kind, tells_apart


def closeness(parse: dict, intent: str, slots: dict) -> float:
    """Slot F1 against the true parse, the intent counted as one more slot."""
    pred = set(parse["slots"].items()) | {("intent", parse["intent"])}
    true = set(slots.items()) | {("intent", intent)}
    return 2 * len(pred & true) / (len(pred) + len(true))


def audit(pairs: pd.DataFrame, world: str, schema) -> pd.DataFrame:
    log = pd.read_parquet(f"{world}/log.parquet", columns=["query_id", "user_city", "query", "period"])
    log = log[log["period"] == "early"]
    needs = pd.read_parquet(f"{world}/audit/needs.parquet", columns=["query_id", "intent", "slots"]).set_index(
        "query_id"
    )
    wanted = {(normalize_text(q), c) for q, c in zip(pairs["query"], pairs["user_city"])}
    truth = {}
    for qid, city, query in zip(log["query_id"], log["user_city"], log["query"]):
        key = (normalize_text(query), city)
        if key in wanted and key not in truth:
            truth[key] = (needs.at[qid, "intent"], json.loads(needs.at[qid, "slots"]))
    rows = []
    for r in pairs.itertuples():
        intent, slots = truth[(normalize_text(r.query), r.user_city)]
        chosen, rejected = json.loads(r.chosen), json.loads(r.rejected)
        c, w = closeness(chosen, intent, slots), closeness(rejected, intent, slots)
        rows.append(
            {
                "query": r.query,
                "agrees": "agrees" if c > w else "disagrees" if c < w else "tie",
                "rejects": "greedy" if getattr(r, "rejected_is_greedy", False) else "sample",
                "kind": pair_kind(schema, r.chosen, r.rejected),
                "kept": tells_apart(schema, r.chosen, r.rejected),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, help="pair file (pairs.parquet of a `train dpo` run)")
    ap.add_argument(
        "--world", required=True, help="the world folder the pairs were drawn from (its audit/ holds the truth)"
    )
    ap.add_argument("--schema", default=None, help="schema YAML (default: the embedded one)")
    args = ap.parse_args()
    schema = load_schema(args.schema) if args.schema else load_schema()
    table = audit(pd.read_parquet(args.pairs), args.world, schema)
    counts = pd.crosstab([table["kept"], table["kind"], table["rejects"]], table["agrees"], margins=True)
    print(f"{len(table)} pairs against the hidden needs (agrees: the chosen parse is closer to the truth)")
    print(counts.to_string())
    summary = {
        "pairs": len(table),
        **{f"all_{k}": int(v) for k, v in Counter(table["agrees"]).items()},
        **{f"kept_{k}": int(v) for k, v in Counter(table.loc[table["kept"], "agrees"]).items()},
        **{f"removed_{k}": int(v) for k, v in Counter(table.loc[~table["kept"], "agrees"]).items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
