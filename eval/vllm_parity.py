"""Do the vLLM and transformers backends give the same greedy parses? Run in the vLLM environment (`make vllm-env`).

Reads the transformers backend's predictions (`querytune eval parse --predictions FILE`, made in the main
environment), parses the same texts with the vLLM backend, and prints agreement, the rows that differ and both
speeds, then one JSON line.

    LD_PRELOAD=.venv-vllm/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python eval/vllm_parity.py \\
        --model runs/demo/sft --predictions runs/demo/sft/predictions_test.jsonl [--limit 400]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--predictions", required=True, help="predictions JSONL of `eval parse` (the transformers backend)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument("--dtype", default="bfloat16", help="vLLM dtype (bfloat16 or float32)")
    args = ap.parse_args()
    from querytune.vllm_backend import VLLMBackend

    rows = [json.loads(line) for line in open(args.predictions, encoding="utf-8")][: args.limit]
    texts = [r["text"] for r in rows]
    t0 = time.perf_counter()
    backend = VLLMBackend(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    backend.parse(texts[:8])  # warm-up
    t0 = time.perf_counter()
    preds = backend.parse(texts)
    seconds = time.perf_counter() - t0
    same = [r["pred"] == p.parse for r, p in zip(rows, preds)]
    for r, p, ok in zip(rows, preds, same):
        if not ok:
            print(f"{r['text']!r}\n  transformers: {json.dumps(r['pred'])}\n  vllm:         {json.dumps(p.parse)}  {p.error or ''}")
    summary = {"rows": len(rows), "same_parse": sum(same), "agreement": round(sum(same) / len(rows), 4),
               "vllm_valid": sum(p.valid for p in preds), "vllm_queries_per_s": round(len(rows) / seconds, 2),
               "vllm_load_s": round(load_s, 1), "dtype": args.dtype}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
