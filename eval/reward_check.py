"""Does the retrieval reward know a right parse from a wrong one? A check on the click log, no model needed.

For logged queries of the early log (outside the seed set), the world's audit holds the hidden need: the
true parse. Each true parse is scored by the reward against the query's clicks, next to the same parse
with one thing broken (a slot dropped, the category or cuisine swapped, a filter made up). Prints the mean
rewards and how often the true parse wins, then one JSON line.

    python eval/reward_check.py --world runs/world --index runs/index [--queries 600]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pandas as pd

from querytune.preference import click_targets
from querytune.reward import RetrievalReward
from querytune.schema import load_schema, normalize_text
from querytune.search import Searcher


def broken(parse: dict, schema, rng: random.Random) -> list[tuple[str, dict]]:
    slots, out = parse["slots"], []
    if slots:
        k = rng.choice(sorted(slots))
        out.append(("drop_slot", {"intent": parse["intent"], "slots": {a: b for a, b in slots.items() if a != k}}))
    for name in ("category", "cuisine"):
        if name in slots:
            other = rng.choice([v for v in schema.slots[name].values if v != slots[name]])
            out.append((f"wrong_{name}", {"intent": parse["intent"], "slots": slots | {name: other}}))
    extra = [n for n in ("outdoor_seating", "kid_friendly", "delivery", "open") if n not in slots]
    if extra and parse["intent"] in ("find_business", "book"):
        n = rng.choice(extra)
        out.append(("made_up_filter", {"intent": parse["intent"], "slots": slots | {n: "now" if n == "open" else True}}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True, help="World folder (log.parquet, audit/needs.parquet).")
    ap.add_argument("--index", type=Path, required=True, help="Index folder.")
    ap.add_argument("--queries", type=int, default=600, help="Logged queries to check.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    schema = load_schema()
    reward = RetrievalReward(Searcher(args.index, schema), schema)
    log = pd.read_parquet(args.world / "log.parquet", columns=["query_id", "query", "user_city"])
    needs = pd.read_parquet(args.world / "audit" / "needs.parquet").set_index("query_id")
    need_of = {(normalize_text(q), c): needs.loc[i] for i, q, c in zip(log["query_id"], log["query"], log["user_city"])}
    rng = random.Random(args.seed)
    results: dict[str, list[float]] = {"true": []}
    wins: dict[str, list[bool]] = {}
    for t in click_targets(args.world, args.queries, seed=args.seed):
        need = need_of[(normalize_text(t["query"]), t["user_city"])]
        if need["intent"] == "out_of_scope":
            continue
        true = {"intent": need["intent"], "slots": json.loads(need["slots"])}
        score = lambda p: reward.score(t["query"], json.dumps(p), t["user_city"], t["timestamp"], t["clicks"])  # noqa: E731
        s_true = score(true)
        results["true"].append(s_true)
        for kind, p in broken(true, schema, rng):
            s = score(p)
            results.setdefault(kind, []).append(s)
            wins.setdefault(kind, []).append(s_true > s)
    print(f"{'parse':<16} {'n':>5} {'mean reward':>12} {'true parse wins':>16}")
    for kind, values in results.items():
        w = wins.get(kind)
        print(f"{kind:<16} {len(values):>5} {sum(values) / len(values):>12.3f} {(sum(w) / len(w) if w else float('nan')):>16.3f}")
    print(json.dumps({"queries": len(results["true"]), "true_reward": round(sum(results["true"]) / len(results["true"]), 4),
                      **{f"true_wins_{k}": round(sum(v) / len(v), 4) for k, v in wins.items()},
                      **{f"ties_{k}": round(sum(a == b for a, b in zip(results["true"], results[k])) / len(results[k]), 4)
                         for k in wins if len(results[k]) == len(results["true"])}}))


if __name__ == "__main__":
    main()
