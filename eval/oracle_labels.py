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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import log_texts  # noqa: E402  (eval/compare.py builds the same rows for its label-ceiling row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="world folder (its audit/needs.parquet holds the truth)")
    ap.add_argument("--n", type=int, default=4000, help="early-log texts to label")
    ap.add_argument("--out", required=True, help="JSONL to write: the seed rows and the labeled log texts, shuffled")
    ap.add_argument("--no-seed", action="store_true", help="write only the log texts")
    args = ap.parse_args()
    rows = log_texts(Path(args.world), args.n, "need")
    seed = [] if args.no_seed else [json.loads(line) for line in open(f"{args.world}/seed.jsonl", encoding="utf-8")]
    out = seed + rows
    random.Random(0).shuffle(out)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    print(json.dumps({"log_texts": len(rows), "rows": len(out), "out": args.out}))


if __name__ == "__main__":
    main()
