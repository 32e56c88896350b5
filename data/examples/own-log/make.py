"""Writes this folder's example of a user's own files from a small simulated world, as a search system would export
them: catalog.csv (50 Austin businesses), searches.csv (200 searches by Austin users, each page cut to those 50) and
seed.jsonl (60 labeled rows). `python data/examples/own-log/make.py` rewrites them byte for byte."""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # run from a checkout

from querytune.world.make import make_world  # noqa: E402
from querytune.world.vocab import ATTRIBUTES  # noqa: E402

CITY, BUSINESSES, SEARCHES, SEED = "austin", 50, 200, 60


def main() -> None:
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        make_world(tmp, seed=0, rows=8000, per_city=60)
        catalog = pd.read_parquet(Path(tmp) / "catalog.parquet")
        log = pd.read_parquet(Path(tmp) / "log.parquet")
        seed = [json.loads(line) for line in (Path(tmp) / "seed.jsonl").read_text().splitlines()]
    log = log[log["user_city"] == CITY]
    shown = Counter(b for s in log["shown"] for b in s)
    keep = [b for b, _ in shown.most_common() if b in set(catalog.loc[catalog["city"] == CITY, "business_id"])]
    keep = set(keep[:BUSINESSES])
    rows = []
    for r in log.itertuples():
        pos = [i for i, b in enumerate(r.shown) if b in keep]
        if pos:
            rows.append(
                {
                    "query_id": r.query_id,
                    "timestamp": r.timestamp.isoformat(),
                    "user_city": r.user_city,
                    "query": r.query,
                    "shown": json.dumps([r.shown[i] for i in pos]),
                    "display_p": json.dumps([float(r.display_p[i]) for i in pos]),
                    "clicked": json.dumps([b for b in r.clicked if b in keep]),
                }
            )
    pd.DataFrame(rows[:SEARCHES]).to_csv(HERE / "searches.csv", index=False)
    columns = ["business_id", "name", "city", "neighborhood", "category", "cuisine", "price_level", "rating", "hours"]
    businesses = catalog[catalog["business_id"].isin(keep)][columns + list(ATTRIBUTES)].sort_values("business_id")
    businesses.to_csv(HERE / "catalog.csv", index=False)
    with (HERE / "seed.jsonl").open("w", encoding="utf-8") as f:
        for r in seed[:SEED]:
            f.write(json.dumps({"text": r["text"], "intent": r["intent"], "slots": r["slots"]}) + "\n")


if __name__ == "__main__":
    main()
