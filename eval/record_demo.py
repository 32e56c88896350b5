"""Record a finished demo run as the file the README's demo figures are checked against (tests/test_docs_facts.py).

    python eval/record_demo.py --workspace workspace --out eval/demo_full.json [--wall "58 min 49 s"]
    python eval/record_demo.py --workspace workspace-tiny --out eval/demo_tiny.json

It reads what the run wrote (eval/demo_times.json: each step's seconds and CPU seconds; report/metrics.json: the
report's table) and adds the machine, the date and the commit. Record only a run that did every step (a second run
that skipped them all has its times in the stamps, which this reads too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from querytune.machine import cpu_model  # noqa: E402

TABLE = ("ndcg@10", "recall@10", "mrr", "intent_accuracy", "slot_f1", "frame_exact_match", "validity")


def record(ws: Path, wall: str | None) -> dict:
    times = json.loads((ws / "eval" / "demo_times.json").read_text())
    stamps = {p.stem: json.loads(p.read_text()) for p in sorted((ws / ".stamps").glob("*.json"))}
    metrics = json.loads((ws / "report" / "metrics.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "commit": commit,
        "wall": wall,  # the whole command's time as the user saw it (venv creation included), when given
        "steps_total_seconds": round(sum(s or 0 for s in times["step_seconds"].values()), 1),
        "step_seconds": times["step_seconds"],
        "step_cpu_seconds": {name: s.get("cpu_seconds") for name, s in stamps.items()},
        "test_rows": metrics["meta"]["test_rows"],
        "graded_rows": metrics["meta"]["graded_rows"],
        "barely_trained": metrics.get("barely_trained", []),
        "table": {
            name: {m: [iv["value"], iv["low"], iv["high"]] for m in TABLE if (iv := entry.get(m))}
            for name, entry in metrics["intervals"].items()
        },
        "paired_ndcg": {
            name: [d["ndcg@10"]["value"], d["ndcg@10"]["low"], d["ndcg@10"]["high"]]
            for name, d in metrics.get("paired", {}).items()
            if d.get("ndcg@10")
        },
        "baseline": metrics.get("baseline"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="The demo's workspace (after a run).")
    ap.add_argument("--out", type=Path, required=True, help="The JSON record to write, e.g. eval/demo_tiny.json.")
    ap.add_argument("--wall", help="The whole command's time as measured outside (e.g. `time make demo-tiny`).")
    args = ap.parse_args()
    rec = record(args.workspace, args.wall)
    args.out.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps({k: rec[k] for k in ("date", "cpu", "commit", "wall", "steps_total_seconds")}))


if __name__ == "__main__":
    main()
