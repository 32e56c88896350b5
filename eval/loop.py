r"""One round of the closed loop on a world, every step a `querytune` command, resumable (a step whose output exists
is not redone):

    python eval/loop.py --out runs/loop_w0 [--seed 0] [--days 35-41] [--explore-share 0.5] [--validate]

1. `world make`, `index build`, `train sft --preset quick` (skipped where --world/--index/--sft are given);
2. round 1: `train rft --click-values` from SFT on the world's log;
3. `world traffic`: round 1 served over --days with the exploration bucket (`--explore-share`);
4. `world extend` (the log + that traffic) and round 2: the same `train rft --click-values` on it;
5. `eval offpolicy`: round 1 and round 2 estimated on the bucket;
6. test NDCG@10 of SFT, round 1 and round 2, overall and per world mechanism, each paired with round 1
   (`eval/compare.py`'s table);
7. with --controls, two more rows: round 2's placebo (`world extend --placebo-seed`: the bucket's clicks permuted
   within each text and city, then the same RFT) and self-training on the log + traffic texts (`--edits none`);
8. with --validate, the truth the off-policy estimate is checked against: each round served greedily to the
   bucket's requests (`world traffic --explore-share 0 --bucket-of`), their click rate (the same users: their clicks
   depend on what is shown, not on the policy) and true NDCG@10.

Writes OUT/loop.json and prints it. Reads the world's audit only for the evaluation (the test slices, the regret and
the truth of step 7); the training steps never see it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/loop.py` from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import ceiling_table  # noqa: E402

from querytune.evaluation.retrieval_eval import load_rows  # noqa: E402
from querytune.evaluation.scores import load_predictions, score_systems  # noqa: E402
from querytune.machine import hardware  # noqa: E402
from querytune.schema_file import load_schema  # noqa: E402
from querytune.search import Searcher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for every step's output and loop.json.")
    ap.add_argument("--seed", type=int, default=0, help="World seed (with --world absent).")
    ap.add_argument("--world", type=Path, help="An existing world (default: made in OUT/world).")
    ap.add_argument("--index", type=Path, help="An existing index of that world (default: built in OUT/index).")
    ap.add_argument("--sft", type=Path, help="An existing SFT model (default: trained in OUT/sft, quick preset).")
    ap.add_argument("--days", default="35-41", help="The served window, days of the log (the early part: 0-41).")
    ap.add_argument(
        "--explore-share",
        type=float,
        default=0.5,
        help="The bucket's share of the served requests (0.5: regret 0.012 on world v2 seed 0).",
    )
    ap.add_argument("--texts", type=int, default=4000, help="Log texts each RFT round labels (its --texts).")
    ap.add_argument("--split", default="test", choices=["dev", "test"], help="Tune on dev; report test once.")
    ap.add_argument("--controls", action="store_true", help="Also the placebo and self-training rows (step 7).")
    ap.add_argument("--validate", action="store_true", help="Also serve each round greedily (step 8).")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    qt = [str(Path(sys.executable).parent / "querytune")]
    seconds: dict[str, float] = {}

    def step(name: str, done: Path, cmd: list[str]) -> None:
        if done.exists():
            print(f"loop: {name}: {done} exists, kept", flush=True)
            return
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(qt + cmd, check=True)
        seconds[name] = round(time.perf_counter() - t0, 1)

    world, index, sft = args.world or out / "world", args.index or out / "index", args.sft or out / "sft"
    step("world", world / "stats.json", ["world", "make", "--out", str(world), "--seed", str(args.seed)])
    step("index", index / "index.faiss", ["index", "build", "--world", str(world), "--out", str(index)])
    step("sft", sft / "summary.json", ["train", "sft", "--data", str(world / "seed.jsonl"), "--out", str(sft)])
    rounds = {"round1": world, "round2": out / "world_round2"}
    rft = ["train", "rft", "--init", str(sft), "--index", str(index), "--click-values", "--texts", str(args.texts)]
    step("round1", out / "round1" / "summary.json", [*rft, "--world", str(world), "--out", str(out / "round1")])
    traffic = out / "traffic_round1"
    step(
        "traffic",
        traffic / "log.parquet",
        ["world", "traffic", "--world", str(world), "--model", str(out / "round1"), "--index", str(index),
         "--days", args.days, "--explore-share", str(args.explore_share), "--out", str(traffic)],
    )  # fmt: skip
    step(
        "extend",
        rounds["round2"] / "log.parquet",
        ["world", "extend", "--world", str(world), "--traffic", str(traffic / "log.parquet"),
         "--out", str(rounds["round2"])],
    )  # fmt: skip
    step(
        "round2",
        out / "round2" / "summary.json",
        [*rft, "--world", str(rounds["round2"]), "--out", str(out / "round2")],
    )
    controls = {}
    if args.controls:
        # the same model's greedy parses of the same texts (a placebo keeps every text): parsed once, in round 2
        reuse = ["--greedy-from", str(out / "round2" / "greedy.jsonl")]
        placebo_world = out / "world_round2_placebo"
        step(
            "extend_placebo",
            placebo_world / "log.parquet",
            ["world", "extend", "--world", str(world), "--traffic", str(traffic / "log.parquet"),
             "--placebo-seed", "0", "--out", str(placebo_world)],
        )  # fmt: skip
        step(
            "round2_placebo",
            out / "round2_placebo" / "summary.json",
            [*rft, "--world", str(placebo_world), "--out", str(out / "round2_placebo"), *reuse],
        )
        step(
            "self_train2",
            out / "self_train2" / "summary.json",
            [*rft, "--edits", "none", "--world", str(rounds["round2"]), "--out", str(out / "self_train2"), *reuse],
        )
        controls = {"round2_placebo": out / "round2_placebo", "self_train2": out / "self_train2"}
    step(
        "offpolicy",
        out / "offpolicy.json",
        ["eval", "offpolicy", "--log", str(traffic / "log.parquet"), "--model", f"round1={out / 'round1'}",
         "--model", f"round2={out / 'round2'}", "--out", str(out / "offpolicy.json")],
    )  # fmt: skip
    split = world / f"{args.split}.jsonl"
    models = {"sft": sft, "round1": out / "round1", "round2": out / "round2", **controls}
    for name, folder in models.items():
        preds = out / "predictions" / f"{name}_{args.split}.jsonl"
        step(
            f"predict_{name}",
            preds,
            ["eval", "parse", "--model", str(folder), "--data", str(split),
             "--out", str(out / "predictions" / f"{name}_{args.split}_parse.json"), "--predictions", str(preds)],
        )  # fmt: skip
    truth = {}
    if args.validate:
        bucket = pd.read_parquet(traffic / "log.parquet", columns=["query_id", "policy"])
        ids = set(bucket.loc[bucket["policy"] == "explore", "query_id"])
        for name in ("round1", "round2"):
            served = out / f"traffic_{name}_greedy"
            step(
                f"truth_{name}",
                served / "log.parquet",
                ["world", "traffic", "--world", str(world), "--model", str(models[name]), "--index", str(index),
                 "--days", args.days, "--explore-share", "0", "--bucket-of", str(traffic / "log.parquet"),
                 "--out", str(served)],
            )  # fmt: skip
            log = pd.read_parquet(served / "log.parquet", columns=["query_id", "clicked"])
            assert set(log["query_id"]) == ids, f"{served}: not the bucket's requests"
            regret = json.loads((served / "audit" / "regret.json").read_text())
            truth[name] = {
                "bucket_ctr": round(float(log["clicked"].map(len).gt(0).mean()), 6),
                "bucket_clicks": round(float(log["clicked"].map(len).mean()), 6),
                "bucket_requests": len(log),
                "bucket_ndcg10": regret["all"]["served_ndcg10"],
            }

    rows = load_rows(split)
    schema = load_schema(sft / "schema.yaml")
    searcher = Searcher(index, schema)
    parses = {name: load_predictions(out / "predictions" / f"{name}_{args.split}.jsonl", rows) for name in models}
    scores, _ = score_systems(rows, parses, searcher, schema)
    table = ceiling_table(scores, rows, ["raw", *models, "oracle"], base="round1")
    result = {
        "table": table,
        "offpolicy": json.loads((out / "offpolicy.json").read_text()),
        "truth": truth,
        "regret": json.loads((traffic / "audit" / "regret.json").read_text()),
        "edits_accepted": {
            name: int(pd.read_csv(models[name] / "edits.csv")["accepted"].sum())
            for name in models
            if (models[name] / "edits.csv").is_file()
        },
        "meta": {
            "world": str(world),
            "days": args.days,
            "explore_share": args.explore_share,
            "texts": args.texts,
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip(),
            "split": args.split,
            "seconds_this_run": seconds,
            "hardware": hardware(),
            "bootstrap": {"draws": 2000, "interval": "percentile 95%", "unit": "graded query", "paired_with": "round1"},
        },
    }
    (out / "loop.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
