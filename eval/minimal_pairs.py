r"""Minimal DPO pairs: rebuild a run's pairs so chosen and rejected differ only in the "what" and "where".

For each query of a `train dpo` run's `candidates.parquet`, the best candidate and each worse one are mapped onto
the greedy parse: the greedy parse's other slots (price, hours, attributes...) with the candidate's "what"/"where"
slots (`CORE_FILTERS`). The two are scored again and kept as a pair when the gap is still >= --min-gap and the
clicks can tell them apart (`tells_apart`). The experiment behind eval/RESULTS.md's "minimal pairs" rows: train on the
result with `querytune train dpo --pairs OUT ...`, and audit it with `eval/pair_audit.py`.

    python eval/minimal_pairs.py --run runs/dpo --world runs/world --index runs/index --queries 2000 \
        --out runs/dpo/pairs_minimal.parquet
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from querytune.runtime.model import ModelFolder
from querytune.schema import ParseError
from querytune.search import Searcher
from querytune.train.pair_rules import CORE_FILTERS, _intent, tells_apart
from querytune.train.reward import RetrievalReward
from querytune.train.targets import click_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `train dpo` output folder (candidates.parquet, and its schema)")
    ap.add_argument("--world", required=True, help="the world the run drew its queries from")
    ap.add_argument("--index", required=True, help="the index the run scored with")
    ap.add_argument("--queries", type=int, required=True, help="the run's `queries` (to draw the same targets)")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed")
    ap.add_argument("--min-gap", type=float, default=0.3)
    ap.add_argument("--per-query", type=int, default=2)
    ap.add_argument("--out", required=True, help="pair file to write (Parquet)")
    args = ap.parse_args()

    schema = ModelFolder.open(args.run).schema
    reward = RetrievalReward(Searcher(args.index, schema), schema)
    targets = {(t["query"], t["user_city"]): t for t in click_targets(args.world, args.queries, seed=args.seed)}
    core = {n for n, s in schema.slots.items() if s.filter in CORE_FILTERS}

    def onto(anchor: str, source: str) -> str | None:
        a, b = json.loads(anchor), json.loads(source)
        slots = {k: v for k, v in a["slots"].items() if k not in core} | {
            k: v for k, v in b["slots"].items() if k in core
        }
        try:
            return schema.parse({"intent": b["intent"], "slots": slots}).to_json()
        except ParseError:
            return None

    rows = []
    for (query, city), group in pd.read_parquet(f"{args.run}/candidates.parquet").groupby(
        ["query", "user_city"], sort=False
    ):
        if len(group) < 2:
            continue
        t, scores = targets[(query, city)], dict(zip(group["candidate"], group["reward"]))
        greedy = group.loc[group["is_greedy"], "candidate"].iloc[0]
        best = max(scores, key=scores.get)
        if scores[best] <= 0:
            continue
        anchor = greedy if scores[greedy] >= 0 and _intent(greedy) == _intent(best) else best
        chosen = onto(anchor, best)
        if chosen is None:
            continue
        score = lambda c: reward.score(query, c, city, t["timestamp"], t["gains"])  # noqa: E731
        chosen_score, worse = score(chosen), set()
        for c in scores:
            rejected = onto(anchor, c) if c != best and scores[c] >= 0 and _intent(c) == _intent(best) else None
            if (
                rejected is not None
                and rejected != chosen
                and chosen_score - score(rejected) >= args.min_gap
                and tells_apart(schema, chosen, rejected)
            ):
                worse.add((rejected != greedy, score(rejected), rejected))
        for _, rejected_score, rejected in sorted(worse)[: args.per_query]:
            rows.append(
                {
                    "query": query,
                    "user_city": city,
                    "timestamp": t["timestamp"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_score": chosen_score,
                    "rejected_score": rejected_score,
                    "rejected_is_greedy": rejected == greedy,
                }
            )
    pairs = pd.DataFrame(rows)
    pairs.to_parquet(args.out, index=False)
    print(f"{len(pairs)} minimal pairs from {pairs['query'].nunique() if len(pairs) else 0} queries; {args.out}")


if __name__ == "__main__":
    main()
