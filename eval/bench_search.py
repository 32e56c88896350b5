"""Search speed benchmark: structured vs raw vs BM25 on real test queries, and FAISS flat vs HNSW at scale.

    python eval/bench_search.py --world runs/demo/world --index runs/demo/index [--n 300] [--scale 100000]

Prints queries/s for each way of searching the default index (the embedding cache cleared for the cold
run), then exact (flat) vs approximate (HNSW) FAISS search on a catalog scaled to --scale vectors (the
real business vectors plus jittered copies): ms/query, the speed-up as a ratio to flat measured in the
same run, and HNSW's recall@10 against flat's exact neighbours. Writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import faiss
import numpy as np

from querytune.evaluation.retrieval_eval import load_rows
from querytune.schema_file import load_schema
from querytune.search import Context, Searcher


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="world folder (test.jsonl)")
    ap.add_argument("--index", type=Path, required=True, help="index folder (flat)")
    ap.add_argument("--n", type=int, default=300, help="test queries to time")
    ap.add_argument("--scale", type=int, default=100_000, help="vectors in the scaled flat-vs-HNSW catalog")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = ap.parse_args()

    schema = load_schema()
    searcher = Searcher(args.index, schema)
    rows = [r for r in load_rows(args.world / "test.jsonl") if r.get("relevance")][: args.n]
    items = [
        (
            schema.parse({"intent": r["intent"], "slots": r["slots"]}),
            Context(r["user_city"], datetime.fromisoformat(r["timestamp"])),
            r["text"],
        )
        for r in rows
    ]
    searcher.embedder.cache.clear()
    figures = {"queries": len(items)}
    figures["structured_cold_qps"] = rate(lambda it: searcher.search(it[0], it[1], 10, it[2]), items)
    figures["structured_warm_qps"] = rate(lambda it: searcher.search(it[0], it[1], 10, it[2]), items)
    searcher.embedder.cache.clear()
    figures["raw_cold_qps"] = rate(lambda it: searcher.raw(it[2], it[1], 10), items)
    searcher.bm25(items[0][2], items[0][1])  # build the BM25 index outside the timing
    figures["bm25_qps"] = rate(lambda it: searcher.bm25(it[2], it[1], 10), items)

    base = searcher.index.reconstruct_n(0, searcher.index.ntotal)
    rng = np.random.default_rng(0)
    reps = int(np.ceil(args.scale / len(base)))
    big = np.concatenate([base + rng.normal(0, 0.02, base.shape).astype(np.float32) for _ in range(reps)])[: args.scale]
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    queries = searcher.embedder.encode([it[2] for it in items])
    flat = faiss.IndexFlatIP(big.shape[1])
    flat.add(big)
    hnsw = faiss.IndexHNSWFlat(big.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    hnsw.add(big)
    figures["hnsw_build_s"] = time.perf_counter() - t
    hnsw.hnsw.efSearch = 64
    for name, index in (("flat", flat), ("hnsw", hnsw)):
        t = time.perf_counter()
        for q in queries:
            index.search(q[None], 10)
        figures[f"{name}_ms_per_query"] = 1000 * (time.perf_counter() - t) / len(queries)
    _, exact = flat.search(queries, 10)
    _, approx = hnsw.search(queries, 10)
    figures["hnsw_recall@10_vs_flat"] = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
    figures["hnsw_speedup_vs_flat"] = figures["flat_ms_per_query"] / figures["hnsw_ms_per_query"]
    figures["scale"] = len(big)
    for k, v in figures.items():
        print(f"{k:28s} {v:10.3f}" if isinstance(v, float) else f"{k:28s} {v:10d}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
