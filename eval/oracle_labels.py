"""The ceiling of what the click log can teach: label early-log texts with the world's hidden needs (the true parses).

Training on seed + these rows (`querytune train sft --init SFT --data OUT`) is what a click-trained stage could at
best approach: its labels come from clicks, these from the truth. Compare it with SFT continued on the seed alone.

    python eval/oracle_labels.py --world runs/demo/world --n 4000 --out runs/demo/oracle4k.jsonl
    querytune train sft --init runs/demo/sft --data runs/demo/oracle4k.jsonl --out runs/demo/sft_oracle4k --preset quick
"""

from __future__ import annotations

import argparse
import json
import random

import pandas as pd

from querytune.schema import normalize_text


def oracle_rows(world: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct early-log texts (not in the seed set; rows drawn uniformly, so texts by traffic) with their true parses."""
    log = pd.read_parquet(f"{world}/log.parquet", columns=["query_id", "query", "period", "timestamp", "user_city"])
    needs = pd.read_parquet(f"{world}/audit/needs.parquet", columns=["query_id", "intent", "slots"]).set_index("query_id")
    seen = {normalize_text(json.loads(line)["text"]) for line in open(f"{world}/seed.jsonl", encoding="utf-8")}
    rows = []
    for r in log[log["period"] == "early"].sample(frac=1.0, random_state=seed).itertuples():
        text = normalize_text(r.query)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": r.query_id, "text": r.query, "intent": needs.at[r.query_id, "intent"], "slots": json.loads(needs.at[r.query_id, "slots"]),
                     "timestamp": r.timestamp.isoformat(), "user_city": r.user_city})
        if len(rows) >= n:
            break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="world folder (its audit/needs.parquet holds the truth)")
    ap.add_argument("--n", type=int, default=4000, help="early-log texts to label")
    ap.add_argument("--out", required=True, help="JSONL to write: the seed rows and the labeled log texts, shuffled")
    ap.add_argument("--no-seed", action="store_true", help="write only the log texts")
    args = ap.parse_args()
    rows = oracle_rows(args.world, args.n)
    seed = [] if args.no_seed else [json.loads(line) for line in open(f"{args.world}/seed.jsonl", encoding="utf-8")]
    out = seed + rows
    random.Random(0).shuffle(out)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    print(json.dumps({"log_texts": len(rows), "rows": len(out), "out": args.out}))


if __name__ == "__main__":
    main()
