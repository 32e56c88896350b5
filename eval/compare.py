r"""The comparison table: every source of labels and every reward stage, from one SFT model, in one run.

    python eval/compare.py --world runs/w0 --index runs/w0_index --sft runs/w0_sft --out runs/compare_w0 \
        [--split test] [--rows self_train,rft]

Rows (NDCG@10 on the split's graded queries, overall and per world mechanism, each with a paired 95% bootstrap
interval against self-training, or against the control where self-training is not among the rows):
- raw, bm25: the query text searched with no understanding; peer: MiniLM + logistic regression on the seed;
- sft: the model given;
- control: that model continued on the seed for `--steps` optimizer steps;
- self_train: the same steps on the seed plus `--texts` early-log texts labeled by the SFT model's own parses
  (`querytune train rft --edits none`): the fair control of every reward stage;
- rft: the same texts relabeled by the edits the clicks support (`querytune train rft`); rft_placebo: with each text
  judged on another text's clicks; rft_no_pool, rft_no_abstain: without pooled tests, without abstention;
- dpo: DPO from the SFT model on rft's accepted edits (edited label chosen, greedy parse rejected;
  `train dpo --edits-from`);
- grpo: GRPO from the SFT model on the miner's abstaining, pooled reward, each edited label in its text's group
  (`train grpo --edits-from`);
- label_ceiling: the same steps on the seed plus the true parses (the world's hidden needs) of the same texts:
  what a stage that learns from the log could at best reach;
- guideline_run: the same texts labeled by the annotation guideline: what labeling more of the log would buy;
- guideline_oracle: search on the guideline's annotation of each test query (no model);
- oracle: search on the true parse.
Each training row runs `querytune train sft` or `train rft` with the steps, batch size, dtype and threads written into
compare.json; minutes are only a cap. The run resumes: a row whose outputs exist is not redone. Writes compare.json,
compare.md and table.json (per system and slice: NDCG@10 and the paired difference from the base row). The edit
audit compares each relabeled text with its hidden need. This script reads the world's audit (the hidden needs)
to make the ceiling rows and the audit; it is an evaluation, never a training stage's input.
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
from querytune.machine import hardware  # noqa: E402
from querytune.metrics import paired_bootstrap  # noqa: E402
from querytune.schema_file import load_schema  # noqa: E402
from querytune.search import Searcher  # noqa: E402
from querytune.train.targets import early_texts  # noqa: E402

TRAINED = ("control", "label_ceiling", "guideline_run")
REWARD_ROWS = {
    "self_train": ["--edits", "none"],
    "rft": [],
    "rft_placebo": ["--shuffle-clicks"],
    "rft_no_pool": ["--no-pool"],
    "rft_no_abstain": ["--no-abstain"],
}  # `querytune train rft` options of each reward row
# the learners on rft's accepted edits, with their own steps and no time cap: DPO six passes over the pairs (its mined
# preset); GRPO --grpo-steps (60: about one pass over seed 0's edited texts and as many anchors, 4 texts a step), at a
# learning rate set before any run, not tuned
LEARNER_ROWS = {"dpo": ["--preset", "mined"], "grpo": ["--lr", "5e-4", "--max-minutes", "0"]}


def settings_differ(args: argparse.Namespace, name: str, config: dict) -> str | None:
    """Why a model trained before (its train_config.json) is not the row `name` of this run, or None where it is."""
    expected = {"init": str(args.sft.resolve())}
    if name in LEARNER_ROWS:
        expected |= {
            "grpo": {"max_steps": args.grpo_steps, "lr": 5e-4, "max_minutes": None},
            "dpo": {"preset": "mined", "max_minutes": None},
        }[name]
    else:
        expected |= {"max_steps": args.steps, "batch_size": args.batch_size, "dtype": args.dtype}
    if name in REWARD_ROWS:
        expected |= {
            "texts": args.texts,
            "edits": "none" if name == "self_train" else "mined",
            "shuffle_clicks": name == "rft_placebo",
            "pool": name != "rft_no_pool",
            "abstain": name != "rft_no_abstain",
        }
        expected |= {"text_contexts": 0} if name != "self_train" else {}
    got = dict(config, init=str(Path(config.get("init", "")).resolve()), max_minutes=config.get("max_minutes") or None)
    wrong = [f"{k} {got.get(k)!r} (this run: {v!r})" for k, v in expected.items() if got.get(k) != v]
    return ", ".join(wrong) or None


def link_trained(args: argparse.Namespace, every: dict[str, Path], chosen: list[str], rows: list[str]) -> None:
    """Link each chosen row's model from --models-from where it was trained with this run's settings (DPO and GRPO
    only beside the rft they learned from), with its predictions on the split; say why where it is not taken."""
    for name in rows:
        src = args.models_from / name
        if name not in chosen or every[name].exists() or not (src / "train_config.json").is_file():
            continue
        config = json.loads((src / "train_config.json").read_text())
        why = settings_differ(args, name, config)
        if (
            name in LEARNER_ROWS
            and Path(config.get("edits_from") or "").resolve() != (args.models_from / "rft").resolve()
        ):
            why = f"it learned from {config.get('edits_from')}, not {args.models_from / 'rft'}"
        if name in LEARNER_ROWS and every["rft"].resolve() != (args.models_from / "rft").resolve():
            why = "this run's rft is not the one it learned from"
        if why:
            print(f"compare: {name}: not taken from {src}: {why}", flush=True)
            continue
        every[name].parent.mkdir(parents=True, exist_ok=True)
        every[name].symlink_to(src.resolve(), target_is_directory=True)
        made = src / f"predictions_{args.split}.jsonl"
        if made.is_file() and not (preds := args.out / "predictions" / f"{name}_{args.split}.jsonl").is_file():
            preds.parent.mkdir(parents=True, exist_ok=True)
            preds.symlink_to(made.resolve())
        print(f"compare: {name}: the model in {src} (trained with this run's settings)", flush=True)


def log_texts(world: Path, n: int, label: str, seed: int = 0) -> list[dict]:
    """The `n` early-log texts every log row adds to the seed (`early_texts`: rows drawn uniformly, so texts by
    traffic), labeled with the hidden need (`label="need"`) or the guideline's annotation (`"annotation"`; a v1
    world has none: its need)."""
    needs = pd.read_parquet(world / "audit" / "needs.parquet").set_index("query_id")
    rows = []
    for r in early_texts(world, n, seed):
        if label == "annotation" and "annotation" in needs.columns:
            parse = json.loads(needs.at[r["query_id"], "annotation"])
        else:
            parse = {"intent": needs.at[r["query_id"], "intent"], "slots": json.loads(needs.at[r["query_id"], "slots"])}
        rows.append(
            {"id": r["query_id"], "text": r["text"], **parse, "timestamp": r["timestamp"], "user_city": r["user_city"]}
        )
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
    ap.add_argument(
        "--world", type=Path, required=True, help="World folder (seed.jsonl, log.parquet, dev/test.jsonl, audit/)."
    )
    ap.add_argument("--index", type=Path, required=True, help="Index folder of the same world.")
    ap.add_argument("--sft", type=Path, required=True, help="The SFT model folder every training row continues from.")
    ap.add_argument(
        "--out",
        type=Path,
        required=True,
        help="Folder for the models, data, predictions and compare.json / compare.md.",
    )
    ap.add_argument("--split", default="test", choices=["dev", "test"], help="Tune on dev; report test once.")
    ap.add_argument("--steps", type=int, default=280, help="Optimizer steps of each training row (the same for all).")
    ap.add_argument("--batch-size", type=int, default=8, help="Examples per step of each training row.")
    ap.add_argument(
        "--texts", type=int, default=4000, help="Early-log texts the ceiling and guideline rows add to the seed."
    )
    ap.add_argument(
        "--dtype",
        default="sft",
        choices=["sft", "fp32", "bf16"],
        help="Training dtype of every row, fixed (not probed per row); sft: the one the given SFT model trained in.",
    )
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads of every training and parsing run."
    )
    ap.add_argument(
        "--max-minutes", type=float, default=0, help="Cap per training row (0: none); the steps are the budget."
    )
    ap.add_argument(
        "--jobs", type=int, default=1, help="Training rows (then parsing runs) at once, each with --threads threads."
    )
    ap.add_argument(
        "--grpo-steps", type=int, default=60, help="Optimizer steps of the grpo row (4 texts x 8 parses each)."
    )
    ap.add_argument(
        "--models-from",
        type=Path,
        default=None,
        help="A folder of models trained before (`make demo`'s workspace/models): a row whose folder is there, trained "
        "with this run's settings, is linked instead of trained, its test predictions reused.",
    )
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=PREDICTIONS",
        help="Also score this predictions file (`querytune eval parse --predictions` on the split) as row NAME, "
        "e.g. a tuning arm trained by hand; repeatable.",
    )
    ap.add_argument(
        "--rows",
        default=",".join((*TRAINED, *REWARD_ROWS, *LEARNER_ROWS)),
        help="Training rows to run, comma-separated (default: all of "
        f"{', '.join((*TRAINED, *REWARD_ROWS, *LEARNER_ROWS))}); rows trained before stay in the table.",
    )
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
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    known = (*TRAINED, *REWARD_ROWS, *LEARNER_ROWS)
    extra = dict(e.split("=", 1) for e in args.extra if "=" in e)
    if len(extra) < len(args.extra) or any(not Path(p).is_file() for p in extra.values()):
        raise SystemExit(
            f"compare: --extra: each must be NAME=PREDICTIONS with an existing file: {', '.join(args.extra)}"
        )
    unknown = set(chosen) - set(known)
    if unknown:
        raise SystemExit(f"compare: --rows: unknown row(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    every = {name: out / "models" / name for name in known}
    # On the stationary profile the guideline is the need: the same data would train the same model twice.
    same_as = (
        {"guideline_run": "label_ceiling"}
        if load_rows(data["guideline_run"]) == load_rows(data["label_ceiling"])
        else {}
    )
    fixed = [
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-minutes",
        str(args.max_minutes),
        "--bf16" if args.dtype == "bf16" else "--no-bf16",
    ]
    if args.models_from:
        link_trained(args, every, chosen, [n for n in known if n not in same_as])
    todo = lambda name: name in chosen and name not in same_as and not (every[name] / "querytune.json").is_file()  # noqa: E731
    timings = run_all(
        [
            (
                qt
                + [
                    "train",
                    "sft",
                    "--init",
                    str(args.sft),
                    "--data",
                    str(data[name]),
                    "--out",
                    str(every[name]),
                    "--force",  # rows with no finished model (`todo`): a stopped run's folder is replaced
                    *fixed,
                ],
                None,
            )
            for name in TRAINED
            if todo(name)
        ],
        env,
        args.jobs,
    )
    greedy = (
        every["self_train"] / "greedy.jsonl"
    )  # every reward row labels the same texts with the same model: parse them once
    for name in [n for n in REWARD_ROWS if todo(n)]:
        reuse = ["--greedy-from", str(greedy)] if greedy.is_file() else []
        timings |= run_all(
            [
                (
                    qt
                    + [
                        "train",
                        "rft",
                        "--init",
                        str(args.sft),
                        "--world",
                        str(world),
                        "--index",
                        str(args.index),
                        "--out",
                        str(every[name]),
                        "--force",
                        "--texts",
                        str(args.texts),
                        *fixed,
                        *reuse,
                        *REWARD_ROWS[name],
                    ],
                    None,
                )
            ],
            env,
            1,
        )
    edited = (every["rft"] / "labels.jsonl").is_file() and any(
        json.loads(line)["edits"] for line in (every["rft"] / "labels.jsonl").open()
    )
    for name in [n for n in LEARNER_ROWS if todo(n)]:  # DPO and GRPO learn from the edits rft's miner accepted
        if edited:
            timings |= run_all(
                [
                    (
                        qt
                        + [
                            "train",
                            name,
                            "--init",
                            str(args.sft),
                            "--world",
                            str(world),
                            "--index",
                            str(args.index),
                            "--out",
                            str(every[name]),
                            "--force",
                            "--edits-from",
                            str(every["rft"]),
                            *LEARNER_ROWS[name],
                            *(["--max-steps", str(args.grpo_steps)] if name == "grpo" else []),
                        ],
                        None,
                    )
                ],
                env,
                1,
            )
        else:
            print(
                f"compare: {name} skipped: rft's miner accepted no edit (or rft was not trained): "
                "nothing to learn from",
                flush=True,
            )
    models = {"sft": args.sft} | {
        name: every[same_as.get(name, name)]
        for name in known
        if (every[same_as.get(name, name)] / "querytune.json").is_file()
    }
    preds, parses = {}, []
    for name, folder in models.items():
        preds[name] = out / "predictions" / f"{same_as.get(name, name)}_{args.split}.jsonl"
        if not preds[name].is_file() and name not in same_as:
            tmp = preds[name].with_suffix(".tmp.jsonl")
            parses.append(
                (
                    qt
                    + [
                        "eval",
                        "parse",
                        "--model",
                        str(folder),
                        "--data",
                        str(split),
                        "--out",
                        str(out / "predictions" / f"{name}_{args.split}_parse.json"),
                        "--predictions",
                        str(tmp),
                    ],
                    (tmp, preds[name]),
                )
            )
    timings |= run_all(parses, env, args.jobs)

    rows = load_rows(split)
    schema = load_schema(args.sft / "schema.yaml")
    searcher = Searcher(args.index, schema)
    parses = {"peer": peer_predictions(seed_rows, rows, schema, searcher.embedder)}
    parses |= {name: load_predictions(preds[name], rows) for name in models}
    parses |= {name: load_predictions(Path(path), rows) for name, path in extra.items()}
    parses["guideline_oracle"] = {
        r["id"]: r.get("annotation") or {"intent": r["intent"], "slots": r["slots"]} for r in rows
    }
    scores, _ = score_systems(rows, parses, searcher, schema)
    systems = ["raw", "bm25", *parses, "oracle"]
    base = "self_train" if "self_train" in parses else "control" if "control" in parses else "sft"
    table = ceiling_table(scores, rows, systems, base)
    steps = {
        name: json.loads((models[name] / "summary.json").read_text()).get("steps")
        if (models[name] / "summary.json").is_file()
        else None
        for name in models
        if name != "sft"
    }
    audit = {
        name: edit_audit(models[name] / "labels.jsonl", world)
        for name in REWARD_ROWS
        if name in models and name != "self_train"
    }
    result = {
        "table": table,
        "edit_audit": audit,
        "meta": {
            "world": str(world),
            "split": args.split,
            "graded_rows": sum(bool(r.get("relevance")) for r in rows),
            "sft": str(args.sft),
            "steps": args.steps,
            "steps_done": steps,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "threads": args.threads,
            "texts": args.texts,
            "same_data_as": same_as,
            "seconds_this_run": timings,
            "jobs": args.jobs,
            "hardware": hardware(),
            "bootstrap": {"draws": 2000, "interval": "percentile 95%", "unit": "graded query", "paired_with": base},
        },
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.json").write_text(json.dumps({"paired_with": base, "table": table}, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(result))
    print(markdown(result))


def ceiling_table(scores: pd.DataFrame, rows: list[dict], systems: list[str], base: str = "self_train") -> dict:
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
                entry["vs_base"] = {
                    k: round(v, 4) for k, v in paired_bootstrap(sub[base].to_numpy(), sub[name].to_numpy()).items()
                }
            out[group][name] = entry
    return out


def distance(a: dict, b: dict) -> int:
    """How many of the intent and the slot values two parses disagree on.

    >>> distance({"intent": "find_business", "slots": {"cuisine": "italian"}},
    ...          {"intent": "find_business", "slots": {"cuisine": "pizza"}})
    1
    """
    return (a["intent"] != b["intent"]) + sum(
        a["slots"].get(k) != b["slots"].get(k) for k in set(a["slots"]) | set(b["slots"])
    )


def edit_audit(labels: Path, world: Path) -> dict:
    """Each text a reward row relabeled against its hidden need: is the edited label closer to it than the greedy parse
    (`distance`), overall and per accepted edit (kind, trigger, slot, old -> new)?"""
    if not labels.is_file():
        return {}
    needs = pd.read_parquet(world / "audit" / "needs.parquet").set_index("query_id")
    out = {"texts_edited": 0, "closer": 0, "farther": 0, "same": 0}
    per_edit: dict[str, dict[str, int]] = {}
    for line in labels.read_text().splitlines():
        r = json.loads(line)
        if not r["edits"] or r["id"] not in needs.index:
            continue
        need = {"intent": needs.at[r["id"], "intent"], "slots": json.loads(needs.at[r["id"], "slots"])}
        gap = distance(r["greedy"], need) - distance({"intent": r["intent"], "slots": r["slots"]}, need)
        verdict = "closer" if gap > 0 else "farther" if gap < 0 else "same"
        out["texts_edited"] += 1
        out[verdict] += 1
        for e in r["edits"]:
            name = f"{e['kind']} '{e['trigger']}': {e['slot']} {json.dumps(e['old'])} -> {json.dumps(e['new'])}"
            per_edit.setdefault(name, {"closer": 0, "farther": 0, "same": 0})[verdict] += 1
    out["share_closer"] = round(out["closer"] / out["texts_edited"], 4) if out["texts_edited"] else None
    out["share_farther"] = round(out["farther"] / out["texts_edited"], 4) if out["texts_edited"] else None
    out["by_edit"] = dict(sorted(per_edit.items(), key=lambda kv: -sum(kv[1].values())))
    return out


def markdown(result: dict) -> str:
    table, meta = result["table"], result["meta"]
    systems = [k for k in table["all"] if k != "n"]
    lines = [
        f"NDCG@10 on {meta['split']} ({meta['graded_rows']} graded queries), {meta['world']}; in brackets: "
        f"the paired difference from {meta['bootstrap']['paired_with']} with its 95% interval; training rows: "
        f"{meta['steps']} steps x {meta['batch_size']}, {meta['dtype']}, {meta['threads']} threads, "
        f"from {meta['sft']}; {meta['hardware']}."
        + "".join(f" {a} is {b}'s model (the same training data)." for a, b in meta.get("same_data_as", {}).items()),
        "",
        "| system | " + " | ".join(f"{g} (n={table[g]['n']})" for g in table) + " |",
        "|---|" + "---|" * len(table),
    ]
    for name in systems:
        cells = []
        for g in table:
            e = table[g][name]
            d = e.get("vs_base")
            cells.append(
                f"{e['ndcg@10']:.3f}" + (f" ({d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])" if d else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, audit in result.get("edit_audit", {}).items():
        if audit:
            lines.append(
                f"\n{name}: {audit['texts_edited']} log texts relabeled; against the hidden need the edited label is "
                f"closer than the greedy parse for {audit['closer']}, farther for {audit['farther']}, "
                f"as far for {audit['same']}."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
