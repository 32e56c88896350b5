"""SFT step efficiency on this machine: trained tokens a second, model FLOP/s, and the matmul ceiling of the same
step's shapes, for a preset's real batches; the preset against the step as it was before its levers, in one run.

    python eval/bench_sft.py [--data workspace/world/seed.jsonl] [--preset quick] [--steps 10] [--rounds 2] [--levers]

Runs the real SFT stage (`querytune.train.sft.train_sft`) for `--steps` timed optimizer steps (after one warm-up
step) on real labeled rows, `--rounds` times in alternating order, for two settings: `now` (the preset as it is)
and `before` (padded rows, logits at every position, LoRA dropout 0.05, fp32 weight storage, sdpa: the step up
to 2026-12-05). Both draw the same batches (same seed and sampler), at the dtype the preset's probe picks
(measured afresh here). `--levers` also times each lever alone on top of `before`.

Model FLOPs of a step (`querytune.train.step.step_flops`, 2 FLOPs a multiply-add):
    4 N_frozen tokens + 6 N_lora tokens + 4 N_head targets + 6 layers d_q sum(L^2)
over the step's real tokens (no padding), the completion tokens the loss reads (targets) and the sequence lengths L.
The ceiling: the same step's matmuls (every linear's forward and input gradient at the step's median token count,
the adapters' forward and gradients, the head at its median targets) timed alone with torch.mm at the trainer's
dtype and threads; ratio = achieved / ceiling. Prints a table with the CPU model, then one JSON line.
Default data: the quick preset's world (`querytune world make --out workspace/world`, made here when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from querytune.labeled import load_labeled
from querytune.machine import cpu_model
from querytune.runtime.model import resolve_base
from querytune.schema_file import load_schema
from querytune.train.sft import LORA_TARGETS, PRESETS, train_sft

BEFORE = {
    "padding_free": False,
    "completion_logits": False,
    "lora_dropout": 0.05,
    "bf16_weights": False,
    "attention": "sdpa",
}
LEVERS = {
    "padding_free": True,
    "completion_logits": True,
    "lora_dropout": 0.0,
    "bf16_weights": True,
    "attention": "packed",
}


def matmul_ceiling(model, lora_r: int, tokens: int, targets: int, dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of torch.mm over one step's matmul shapes (forward and input gradients of every frozen linear at
    `tokens` rows; LoRA forward, input and weight gradients; the head at `targets` rows), each timed alone."""
    head = model.get_output_embeddings()
    shapes: dict[tuple[int, int, int], int] = {}

    def add(m: int, k: int, n: int, count: int = 1) -> None:
        shapes[m, k, n] = shapes.get((m, k, n), 0) + count

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            add(tokens, module.in_features, module.out_features)  # forward
            add(tokens, module.out_features, module.in_features)  # input gradient
            if any(name.endswith(t) for t in LORA_TARGETS):
                i, o = module.in_features, module.out_features
                for m, k, n in [
                    (tokens, i, lora_r),
                    (tokens, lora_r, o),
                    (tokens, o, lora_r),
                    (lora_r, tokens, o),
                    (tokens, lora_r, i),
                    (lora_r, tokens, i),
                ]:
                    add(m, k, n)
    add(targets, head.in_features, head.out_features)
    add(targets, head.out_features, head.in_features)
    flops = seconds = 0.0
    for (m, k, n), count in shapes.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        seconds += (time.perf_counter() - start) / reps * count
        flops += 2 * m * k * n * count
    return flops / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=Path("workspace/world/seed.jsonl"),
        help="labeled rows (default: the demo world's seed set, made when missing)",
    )
    ap.add_argument("--schema", type=Path, default=None, help="schema the labels follow (default: data/schema.yaml)")
    ap.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument(
        "--preset", default="quick", choices=sorted(PRESETS), help="the preset whose batches, LoRA and levers are timed"
    )
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each setting, in alternating order")
    ap.add_argument("--levers", action="store_true", help="also time each lever alone on top of `before`")
    args = ap.parse_args()
    if not args.data.is_file():
        if args.data != Path("workspace/world/seed.jsonl"):
            raise SystemExit(f"{args.data}: not found")
        from querytune.world.make import make_world

        print("making the demo world in workspace/world (what `make demo` makes first; about a minute)", flush=True)
        make_world(Path("workspace/world"))
    schema = load_schema(args.schema)
    rows, _ = load_labeled(args.data, schema)
    base = resolve_base(args.base)
    preset = PRESETS[args.preset] | {"max_steps": args.steps + 1, "warmup_steps": 0, "max_minutes": None, "epochs": 1.0}
    settings = {"now": {}, "before": BEFORE}
    if args.levers:
        settings |= {f"before + {k}={v}": BEFORE | {k: v} for k, v in LEVERS.items() if k != "attention"}
        settings["before + padding_free + attention=packed"] = BEFORE | {
            "padding_free": True,
            "attention": "packed",
        }  # packed reads a padding-free row
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    summaries: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the dtype probes measured in this run, not this machine's cached ones
        os.environ["QUERYTUNE_MODEL_CACHE"] = tmp
        names = list(settings)
        for round_ in range(args.rounds):  # alternate the order, so a busy spell on a shared machine hits every setting
            for name in names if round_ % 2 == 0 else names[::-1]:
                out = Path(tmp) / f"{round_}-{len(runs[name])}-{name.replace(' ', '_')}"
                summaries[name] = train_sft(rows, schema, out, base, preset | settings[name], say=lambda _: None)
                steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()][
                    1:
                ]  # first: warm-up
                runs[name].append(steps)
                print(
                    f"  round {round_ + 1}: {name}: median {statistics.median(s['seconds'] for s in steps):.2f} s/step "
                    f"({summaries[name]['dtype']})",
                    flush=True,
                )
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from querytune.train.step import lora_parameters, step_flops

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    n_lora = lora_parameters(model, LoraConfig(r=preset.lora_r, target_modules=LORA_TARGETS))
    counted = [
        s for run in runs["now"] for s in run
    ]  # the counts of each step's batch; every setting draws the same batches
    per_index = {
        i: step_flops(model, n_lora, s["step_tokens"], s["step_targets"], s["step_sum_sq"])
        for i, s in enumerate(runs["now"][0])
    }
    tokens = {i: s["step_tokens"] for i, s in enumerate(runs["now"][0])}

    def figures(name: str) -> dict:
        seconds = [s["seconds"] for run in runs[name] for s in run]
        flops = sum(per_index[i] for run in runs[name] for i in range(len(run)))
        trained = sum(tokens[i] for run in runs[name] for i in range(len(run)))
        return {
            "setting": name,
            "dtype": summaries[name]["dtype"],
            "s_per_step": round(statistics.median(seconds), 3),
            "tokens_per_s": round(trained / sum(seconds), 1),
            "achieved_gflop_s": round(flops / sum(seconds) / 1e9, 1),
            "steps": len(seconds),
        }

    results = {name: figures(name) for name in settings}
    dtype = torch.bfloat16 if summaries["now"]["dtype"] == "bf16" else torch.float32
    ceiling = matmul_ceiling(
        model,
        preset.lora_r,
        int(statistics.median(s["step_tokens"] for s in counted)),
        int(statistics.median(s["step_targets"] for s in counted)),
        dtype,
    )
    now = results["now"]
    cpu = cpu_model()
    print(
        f"\nSFT step, {Path(base).name}, preset {args.preset} (batch {preset.batch_size}), "
        f"{args.rounds} x {args.steps} steps per setting, {len(rows):,} rows of {args.data}\nCPU: {cpu}; "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}\n"
    )
    print("| setting | dtype | s/step (median) | trained tokens/s | model GFLOP/s |\n|---|---|---|---|---|")
    for r in results.values():
        print(
            f"| {r['setting']} | {r['dtype']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['achieved_gflop_s']:.1f} |"
        )
    ratio = now["achieved_gflop_s"] / ceiling
    speedup = sum(s["seconds"] for run in runs["before"] for s in run) / sum(
        s["seconds"] for run in runs["now"] for s in run
    )
    print(
        f"\nmatmul ceiling of the step's shapes ({summaries['now']['dtype']}): {ceiling:.0f} GFLOP/s; "
        f"now at {ratio:.2f} of it; {speedup:.2f}x the step before its levers"
    )
    print(
        json.dumps(
            {
                "cpu": cpu,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "base": base,
                "data": str(args.data),
                "preset": args.preset,
                "batch_size": preset.batch_size,
                "steps": args.steps,
                "rounds": args.rounds,
                "dtype": now["dtype"],
                "tokens_per_s": now["tokens_per_s"],
                "achieved_gflop_s": now["achieved_gflop_s"],
                "ceiling_gflop_s": round(ceiling, 1),
                "ratio": round(ratio, 3),
                "speedup_vs_before": round(speedup, 2),
                "flops_formula": "4 N_frozen tokens + 6 N_lora tokens + 4 N_head targets + 6 layers d_q sum(L^2)",
                "results": list(results.values()),
                "probe": summaries["now"]["dtype_probe"],
            }
        )
    )


if __name__ == "__main__":
    main()
