"""Labeling benchmark: `querytune label` against a naive loop and against the backend's raw batched generate.

    python eval/bench_labeling.py --model runs/demo/sft --log runs/demo/world/log.parquet [--rows 120000] [--backend transformers|vllm]

- naive: a loop over input rows, one model call per row (batch 1, no deduplication), timed on `--naive-sample`
  rows and extrapolated to the whole input: rows/s;
- pipeline: `querytune.label.label` on the first `--rows` rows of the log (read, normalise, deduplicate, label by
  length, write shards): rows/s over the whole run, distinct queries/s over its labeling;
- raw: the same backend's `parse` on `--raw-sample` of the same distinct queries in one call (its own batching):
  distinct queries/s with nothing around it.
All three use one loaded model. Ends with one JSON line: rows/s vs naive, distinct queries/s vs raw.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (the quick-preset SFT model)")
    ap.add_argument("--log", required=True, help="the world's log.parquet (column `query`)")
    ap.add_argument("--rows", type=int, default=None, help="label only the first N rows (default: all)")
    ap.add_argument("--naive-sample", type=int, default=48, help="rows timed one by one for the naive loop")
    ap.add_argument("--raw-sample", type=int, default=512, help="distinct queries for the raw generate reference")
    ap.add_argument("--backend", default="transformers", help="transformers or vllm (run vllm in the vLLM environment)")
    ap.add_argument("--batch-size", type=int, default=32, help="queries per model call")
    args = ap.parse_args()
    from querytune.backends import load_backend
    from querytune.label import by_length, check_query, label

    log = pd.read_parquet(args.log, columns=["query"])
    if args.rows:
        log = log.head(args.rows)
    work = Path(tempfile.mkdtemp(prefix="bench-labeling-"))
    log.to_parquet(work / "log.parquet")
    backend = load_backend(args.backend, args.model, batch_size=args.batch_size)
    rng = random.Random(0)

    sample = rng.sample(list(log["query"]), min(args.naive_sample, len(log)))
    backend.parse(sample[:2])  # warm-up
    t0 = time.perf_counter()
    for q in sample:
        backend.parse([q])
    naive_rps = len(sample) / (time.perf_counter() - t0)

    summary = label(work / "log.parquet", work / "out", backend, shard_size=1024)
    pipeline_rps = summary["rows"] / summary["seconds"]
    pipeline_qps = summary["labeled_now"] / summary["label_seconds"]

    distinct = list(dict.fromkeys(n for n, _ in map(check_query, log["query"]) if n))
    raw = by_length(rng.sample(distinct, min(args.raw_sample, len(distinct))))
    t0 = time.perf_counter()
    backend.parse(raw)
    raw_qps = len(raw) / (time.perf_counter() - t0)

    print(f"rows {summary['rows']:,}, distinct {summary['distinct']:,} ({summary['rows'] / summary['distinct']:.2f} rows per query)")
    print(f"naive loop (batch 1, every row): {naive_rps:8.2f} rows/s")
    print(f"querytune label:                 {pipeline_rps:8.2f} rows/s, {pipeline_qps:.2f} distinct queries/s ({summary['seconds']:.0f} s)")
    print(f"raw batched generate:            {raw_qps:8.2f} queries/s")
    print(json.dumps({"rows": summary["rows"], "distinct": summary["distinct"], "backend": args.backend, "naive_rows_per_s": round(naive_rps, 3),
                      "label_rows_per_s": round(pipeline_rps, 2), "label_queries_per_s": round(pipeline_qps, 2), "raw_queries_per_s": round(raw_qps, 2),
                      "rows_vs_naive": round(pipeline_rps / naive_rps, 2), "queries_vs_raw": round(pipeline_qps / raw_qps, 3),
                      "seconds": summary["seconds"]}))


if __name__ == "__main__":
    main()
