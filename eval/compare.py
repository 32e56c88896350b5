"""The ceiling table: how far each source of labels can take a model, measured from one SFT model in one run.

    python eval/compare.py --world runs/w0 --index runs/i0 --sft runs/w0_sft --out runs/compare_w0 [--split test]

Rows (NDCG@10 on the split's graded queries, overall and per world mechanism, each with a paired 95% bootstrap
interval against the control):
- raw, bm25: the query text searched with no understanding; peer: MiniLM + logistic regression on the seed;
- sft: the model given;
- control: that model continued on the seed for `--steps` optimizer steps;
- label_ceiling: the same steps on the seed plus the true parses (the world's hidden needs) of `--texts` early-log
  texts: what a stage that learns from the log could at best reach;
- guideline_run: the same steps on the seed plus the same texts labeled by the annotation guideline: what labeling
  more of the log would buy;
- guideline_oracle: search on the guideline's annotation of each test query (no model);
- oracle: search on the true parse.
Each training row runs `querytune train sft` with the steps, batch size, dtype and threads written into
compare.json; minutes are only a cap. The run resumes: a row whose outputs exist is not redone. This script reads
the world's audit (the hidden needs) to make the ceiling rows; it is an evaluation, never a training stage's input.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/compare.py` from a checkout

from querytune.evaluation.retrieval_eval import load_rows  # noqa: E402
from querytune.evaluation.scores import load_predictions, peer_predictions, score_systems  # noqa: E402
from querytune.metrics import paired_bootstrap  # noqa: E402
from querytune.runtime.model import hardware  # noqa: E402
from querytune.schema import normalize_text  # noqa: E402
from querytune.schema_file import load_schema  # noqa: E402
from querytune.search import Searcher  # noqa: E402

TRAINED = ("control", "label_ceiling", "guideline_run")


def log_texts(world: Path, n: int, label: str, seed: int = 0) -> list[dict]:
    """`n` distinct early-log texts outside the seed (rows drawn uniformly, so texts by traffic), labeled with the
    hidden need (`label="need"`) or the guideline's annotation (`"annotation"`; a v1 world has none: its need)."""
    log = pd.read_parquet(world / "log.parquet", columns=["query_id", "query", "period", "timestamp", "user_city"])
    needs = pd.read_parquet(world / "audit" / "needs.parquet").set_index("query_id")
    seen = {normalize_text(r["text"]) for r in load_rows(world / "seed.jsonl")}
    rows = []
    for r in log[log["period"] == "early"].sample(frac=1.0, random_state=seed).itertuples():
        text = normalize_text(r.query)
        if text in seen:
            continue
        seen.add(text)
        if label == "annotation" and "annotation" in needs.columns:
            parse = json.loads(needs.at[r.query_id, "annotation"])
        else:
            parse = {"intent": needs.at[r.query_id, "intent"], "slots": json.loads(needs.at[r.query_id, "slots"])}
        rows.append({"id": r.query_id, "text": r.query, **parse, "timestamp": r.timestamp.isoformat(), "user_city": r.user_city})
        if len(rows) >= n:
            break
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.rename(path)  # a half-written file is never taken for a finished one


def run_all(jobs: list[tuple[list[str], Path | None]], env: dict[str, str], at_once: int) -> dict[str, float]:
    """Run each command (at most `at_once` together); after one succeeds, rename its `(tmp, final)` output if given.
    Returns each command's seconds by its --out."""
    pending, running, seconds = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < at_once:
            cmd, rename = pending.pop(0)
            print("$ " + " ".join(cmd), flush=True)
            running.append((subprocess.Popen(cmd, env=env), cmd, rename, time.perf_counter()))
        time.sleep(1)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, cmd, rename, t0 = job
            running.remove(job)
            if proc.returncode != 0:
                raise SystemExit(f"compare: failed ({proc.returncode}): {' '.join(cmd)}")
            if rename:
                rename[0].rename(rename[1])
            seconds[cmd[cmd.index("--out") + 1]] = round(time.perf_counter() - t0, 1)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="World folder (seed.jsonl, log.parquet, dev/test.jsonl, audit/).")
    ap.add_argument("--index", type=Path, required=True, help="Index folder of the same world.")
    ap.add_argument("--sft", type=Path, required=True, help="The SFT model folder every training row continues from.")
    ap.add_argument("--out", type=Path, required=True, help="Folder for the models, data, predictions and compare.json / compare.md.")
    ap.add_argument("--split", default="test", choices=["dev", "test"], help="Tune on dev; report test once.")
    ap.add_argument("--steps", type=int, default=280, help="Optimizer steps of each training row (the same for all).")
    ap.add_argument("--batch-size", type=int, default=8, help="Examples per step of each training row.")
    ap.add_argument("--texts", type=int, default=4000, help="Early-log texts the ceiling and guideline rows add to the seed.")
    ap.add_argument("--dtype", default="sft", choices=["sft", "fp32", "bf16"],
                    help="Training dtype of every row, fixed (not probed per row); sft: the one the given SFT model trained in.")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every training and parsing run.")
    ap.add_argument("--max-minutes", type=float, default=0, help="Cap per training row (0: none); the steps are the budget.")
    ap.add_argument("--jobs", type=int, default=1, help="Training rows (then parsing runs) at once, each with --threads threads.")
    args = ap.parse_args()

    out, world = args.out, args.world
    if args.dtype == "sft":
        config = args.sft / "train_config.json"
        args.dtype = json.loads(config.read_text()).get("dtype", "fp32") if config.is_file() else "fp32"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    qt = [str(Path(sys.executable).parent / "querytune")]
    seed_rows = load_rows(world / "seed.jsonl")
    data = {"control": world / "seed.jsonl"}
    for name, label in (("label_ceiling", "need"), ("guideline_run", "annotation")):
        data[name] = out / "data" / f"{name}.jsonl"
        if not data[name].is_file():
            rows = seed_rows + log_texts(world, args.texts, label)
            random.Random(0).shuffle(rows)
            write_jsonl(rows, data[name])
    split = world / f"{args.split}.jsonl"
    models = {"sft": args.sft} | {name: out / "models" / name for name in TRAINED}
    # On the stationary profile the guideline is the need: the same data would train the same model twice.
    same_as = {"guideline_run": "label_ceiling"} if load_rows(data["guideline_run"]) == load_rows(data["label_ceiling"]) else {}
    for name, twin in same_as.items():
        models[name] = models[twin]
    timings = run_all([(qt + ["train", "sft", "--init", str(args.sft), "--data", str(data[name]), "--out", str(models[name]),
                              "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-minutes", str(args.max_minutes),
                              "--bf16" if args.dtype == "bf16" else "--no-bf16"], None)
                       for name in TRAINED if name not in same_as and not (models[name] / "querytune.json").is_file()], env, args.jobs)
    preds, parses = {}, []
    for name, folder in models.items():
        preds[name] = out / "predictions" / f"{same_as.get(name, name)}_{args.split}.jsonl"
        if not preds[name].is_file() and name not in same_as:
            tmp = preds[name].with_suffix(".tmp.jsonl")
            parses.append((qt + ["eval", "parse", "--model", str(folder), "--data", str(split), "--out",
                                 str(out / "predictions" / f"{name}_{args.split}_parse.json"), "--predictions", str(tmp)], (tmp, preds[name])))
    timings |= run_all(parses, env, args.jobs)

    rows = load_rows(split)
    schema = load_schema(args.sft / "schema.yaml")
    searcher = Searcher(args.index, schema)
    parses = {"peer": peer_predictions(seed_rows, rows, schema, searcher.embedder)}
    parses |= {name: load_predictions(preds[name], rows) for name in models}
    parses["guideline_oracle"] = {r["id"]: r.get("annotation") or {"intent": r["intent"], "slots": r["slots"]} for r in rows}
    scores, _ = score_systems(rows, parses, searcher, schema)
    systems = ["raw", "bm25", *parses, "oracle"]
    table = ceiling_table(scores, rows, systems)
    steps = {name: json.loads((models[name] / "summary.json").read_text()).get("steps") if (models[name] / "summary.json").is_file() else None
             for name in TRAINED}
    result = {"table": table, "meta": {
        "world": str(world), "split": args.split, "graded_rows": sum(bool(r.get("relevance")) for r in rows), "sft": str(args.sft),
        "steps": args.steps, "steps_done": steps, "batch_size": args.batch_size, "dtype": args.dtype, "threads": args.threads,
        "texts": args.texts, "same_data_as": same_as, "seconds_this_run": timings, "jobs": args.jobs, "hardware": hardware(),
        "bootstrap": {"draws": 2000, "interval": "percentile 95%", "unit": "graded query", "paired_with": "control"}}}
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(result))
    print(markdown(result))


def ceiling_table(scores: pd.DataFrame, rows: list[dict], systems: list[str], base: str = "control") -> dict:
    """NDCG@10 of each system overall and per mechanism, with its paired difference from `base`."""
    graded = scores.dropna(subset=["ndcg@10"])
    wide = graded.pivot(index="id", columns="system", values="ndcg@10")
    mech = {r["id"]: r.get("mechanisms") or [] for r in rows}
    groups = {"all": list(wide.index)}
    for m in sorted({m for ms in mech.values() for m in ms}):
        groups[m] = [i for i in wide.index if m in mech[i]]
    groups["none"] = [i for i in wide.index if not mech[i]]
    out: dict = {}
    for group, ids in groups.items():
        sub = wide.loc[ids]
        out[group] = {"n": len(ids)}
        for name in systems:
            entry = {"ndcg@10": round(float(sub[name].mean()), 4)}
            if name != base and base in sub:
                entry["vs_control"] = {k: round(v, 4) for k, v in paired_bootstrap(sub[base].to_numpy(), sub[name].to_numpy()).items()}
            out[group][name] = entry
    return out


def markdown(result: dict) -> str:
    table, meta = result["table"], result["meta"]
    systems = [k for k in table["all"] if k != "n"]
    lines = [f"NDCG@10 on {meta['split']} ({meta['graded_rows']} graded queries), {meta['world']}; training rows: {meta['steps']} steps x "
             f"{meta['batch_size']}, {meta['dtype']}, {meta['threads']} threads, from {meta['sft']}; {meta['hardware']}."
             + "".join(f" {a} is {b}'s model (the same training data)." for a, b in meta.get("same_data_as", {}).items()), "",
             "| system | " + " | ".join(f"{g} (n={table[g]['n']})" for g in table) + " |", "|---|" + "---|" * len(table)]
    for name in systems:
        cells = []
        for g in table:
            e = table[g][name]
            d = e.get("vs_control")
            cells.append(f"{e['ndcg@10']:.3f}" + (f" ({d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])" if d else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
