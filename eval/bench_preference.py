"""DPO and GRPO step times of the quick presets on this machine: the presets as they are against the step before
their levers, in one run, with each lever alone on request.

    python eval/bench_preference.py [--init workspace/models/sft] [--world workspace/world] [--index workspace/index]
                                    [--stage both] [--steps 6] [--rounds 2] [--levers]

Runs the real stages (`querytune.train.dpo.train_dpo` / `querytune.train.grpo.train_grpo`) for `--steps` timed optimizer
steps (after one warm-up step), `--rounds` times in alternating order, for `now` (the preset) and `before` (fp32 weight
storage under bf16 autocast, the LM head at every position, sampling with unmerged adapters outside autocast: the
steps up to 2026-12-05). DPO trains on pairs built from the world's labeled seed rows (chosen: the row's parse;
rejected: the parse of another row with the same intent): the shapes of real pairs (a prompt and two parses),
without the minutes of exploring and scoring that make real ones. GRPO draws the quick preset's kind of texts
(random logged texts with clicks) and scores its samples with the real retrieval reward; it is not screened, which
changes which texts, not their lengths. Prints a table with the CPU model, then one JSON line.
Defaults: what `make demo` writes in ./workspace (its world, index and SFT model).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import torch

from querytune.machine import cpu_model
from querytune.train.dpo import PRESETS as DPO_PRESETS
from querytune.train.dpo import train_dpo  # noqa: E402
from querytune.train.grpo import PRESETS as GRPO_PRESETS  # noqa: E402
from querytune.train.grpo import train_grpo  # noqa: E402

BEFORE = {"bf16_weights": False, "compact_head": False, "merged_sampling": False}
LEVERS = {
    "compact_head": True,
    "bf16_weights": True,
    "merged_sampling": True,
}  # each alone with --levers; the presets keep those that paid


def seed_pairs(world: Path, n: int = 400, seed: int = 0) -> pd.DataFrame:
    """`n` pairs of the seed set's parses: each row's own (chosen) against another same-intent row's (rejected)."""
    rows = [json.loads(line) for line in (world / "seed.jsonl").read_text().splitlines()][:n]
    rng = random.Random(seed)
    canonical = lambda r: json.dumps({"intent": r["intent"], "slots": r["slots"]}, separators=(",", ":"))  # noqa: E731
    pairs = []
    for row in rows:
        rivals = [o for o in rows if o["intent"] == row["intent"] and o["slots"] != row["slots"]] or rows
        pairs.append(
            {
                "query": row["text"],
                "chosen": canonical(row),
                "rejected": canonical(rng.choice(rivals)),
                "chosen_score": 1.0,
                "rejected_score": 0.0,
            }
        )
    return pd.DataFrame(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--init",
        type=Path,
        default=Path("workspace/models/sft"),
        help="SFT model folder both stages start from (default: the demo's)",
    )
    ap.add_argument(
        "--world",
        type=Path,
        default=Path("workspace/world"),
        help="world folder: seed rows (DPO pairs) and the click log (GRPO texts)",
    )
    ap.add_argument(
        "--index", type=Path, default=Path("workspace/index"), help="index folder: the searches GRPO's reward scores"
    )
    ap.add_argument("--stage", choices=["dpo", "grpo", "both"], default="both", help="which stage's step to time")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each setting, in alternating order")
    ap.add_argument("--levers", action="store_true", help="also time each lever alone on top of `before`")
    args = ap.parse_args()
    for path, what in [
        (args.init / "querytune.json", "an SFT model folder (`make demo` writes workspace/models/sft; or pass --init)"),
        (args.world / "seed.jsonl", "a world folder (`querytune world make`; or pass --world)"),
        (args.index / "index.faiss", "an index folder (`querytune index build`; or pass --index)"),
    ]:
        if not path.is_file():
            raise SystemExit(f"{path}: not found; the benchmark needs {what}")
    stages = ["dpo", "grpo"] if args.stage == "both" else [args.stage]
    fixed = {"max_steps": args.steps + 1, "warmup_steps": 0, "max_minutes": None}
    pairs = seed_pairs(args.world) if "dpo" in stages else None
    if "grpo" in stages:
        from querytune.train.reward import retrieval_reward
        from querytune.train.targets import click_targets

        reward, _ = retrieval_reward(args.init, args.index)
        targets = click_targets(args.world, 200, seed=0, pick=GRPO_PRESETS["quick"].pick)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            levers = {k: v for k, v in LEVERS.items() if stage == "grpo" or k != "merged_sampling"}
            before = {k: v for k, v in BEFORE.items() if k in levers}
            settings = {"now": {}, "before": before}
            if args.levers:
                settings |= {f"before + {k}": before | {k: v} for k, v in levers.items()}
            timed: dict[str, list[float]] = {name: [] for name in settings}
            sampling: dict[str, list[float]] = {name: [] for name in settings}
            names = list(settings)
            for round_ in range(args.rounds):  # alternating, so a busy spell on a shared machine hits every setting
                for name in names if round_ % 2 == 0 else names[::-1]:
                    out = Path(tmp) / f"{stage}-{round_}-{name.replace(' ', '_')}"
                    if stage == "dpo":
                        train_dpo(
                            pairs, args.init, out, DPO_PRESETS["quick"] | fixed | settings[name], say=lambda _: None
                        )
                    else:
                        train_grpo(
                            targets,
                            reward,
                            args.init,
                            out,
                            GRPO_PRESETS["quick"] | fixed | settings[name],
                            say=lambda _: None,
                        )
                    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()][
                        1:
                    ]  # first: warm-up
                    timed[name] += [s["seconds"] for s in steps]
                    sampling[name] += [s["sampling_s"] for s in steps if "sampling_s" in s]
                    print(
                        f"  round {round_ + 1}: {stage} {name}: median "
                        f"{statistics.median(s['seconds'] for s in steps):.2f} s/step",
                        flush=True,
                    )
            for name in settings:
                row = {
                    "stage": stage,
                    "setting": name,
                    "s_per_step": round(statistics.median(timed[name]), 3),
                    "steps": len(timed[name]),
                    "total_s": round(sum(timed[name]), 1),
                }
                if sampling[name]:
                    row["sampling_s_per_step"] = round(statistics.median(sampling[name]), 3)
                results.setdefault(stage, []).append(row)
    cpu = cpu_model()
    print(
        f"\nDPO and GRPO quick-preset steps from {args.init}, {args.rounds} x {args.steps} steps per setting\n"
        f"CPU: {cpu}; {torch.get_num_threads()} threads; torch {torch.__version__}\n"
    )
    print("| stage | setting | s/step (median) | of which sampling | speedup over before |\n|---|---|---|---|---|")
    speedups = {}
    for stage, rows in results.items():
        before = next(r for r in rows if r["setting"] == "before")["total_s"]
        for r in rows:
            r["speedup_vs_before"] = round(before / r["total_s"], 2)
            print(
                f"| {stage} | {r['setting']} | {r['s_per_step']:.2f} | {r.get('sampling_s_per_step', '')} | "
                f"{r['speedup_vs_before']:.2f}x |"
            )
        speedups[stage] = next(r for r in rows if r["setting"] == "now")["speedup_vs_before"]
    print(
        json.dumps(
            {
                "cpu": cpu,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "init": str(args.init),
                "steps": args.steps,
                "rounds": args.rounds,
                "speedup_vs_before": speedups,
                "results": [r for rows in results.values() for r in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
