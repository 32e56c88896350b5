"""SFT step time on this machine: fp32 and bf16 autocast, gradient checkpointing on and off, in one run.

    python eval/bench_sft.py [--data workspace/world/seed.jsonl] [--steps 8] [--batch-size 8] [--base smollm2-135m-instruct]

Times `--steps` optimizer steps (after one warm-up step) of the real SFT stage (`querytune.train.sft.train_sft`, the
quick preset's LoRA and learning rate) on real labeled rows for each of the four settings, `--rounds` times in
alternating order, then runs the dtype probe the presets' `bf16: auto` uses (into a fresh cache) to show
whether it picks the faster dtype. Prints a table of s/step (median over the steps: robust to a busy spell on
a shared machine) with the CPU model, and the figures as one JSON line. A world's seed set comes from
`querytune world make --out workspace/world`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from querytune.labeled import load_labeled
from querytune.runtime.model import resolve_base
from querytune.schema_file import load_schema
from querytune.train.sft import LORA_TARGETS, PRESETS, cpu_model, pick_dtype, probe_batch, sft_examples, train_sft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("workspace/world/seed.jsonl"), help="labeled rows (a world's seed.jsonl)")
    ap.add_argument("--schema", type=Path, default=None, help="schema the labels follow (default: data/schema.yaml)")
    ap.add_argument("--base", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per setting")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each setting, in alternating order")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: not found; make a world with `querytune world make --out workspace/world` or pass --data")
    schema = load_schema(args.schema)
    rows, _ = load_labeled(args.data, schema)
    base = resolve_base(args.base)
    preset = PRESETS["quick"] | {"max_steps": args.steps + 1, "batch_size": args.batch_size, "warmup_steps": 0, "max_minutes": None}
    settings = [(dtype, checkpointing) for dtype in ("fp32", "bf16") for checkpointing in (True, False)]
    seconds: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternate the order, so a busy spell on a shared machine hits every setting
            for dtype, checkpointing in settings if round_ % 2 == 0 else settings[::-1]:
                out = Path(tmp) / f"{dtype}-{checkpointing}"
                train_sft(rows, schema, out, base, preset | {"bf16": dtype == "bf16", "gradient_checkpointing": checkpointing}, say=lambda _: None)
                steps = [json.loads(line)["seconds"] for line in (out / "steps.jsonl").read_text().splitlines()][1:]  # first: warm-up
                seconds[dtype, checkpointing] += steps
                print(f"  round {round_ + 1}: {dtype} checkpointing {'on ' if checkpointing else 'off'}: "
                      f"median {statistics.median(steps):.2f} s/step", flush=True)
        results = [{"dtype": d, "gradient_checkpointing": c, "s_per_step": round(statistics.median(t), 3), "mean_s": round(statistics.mean(t), 3),
                    "min_s": min(t), "max_s": max(t), "steps": len(t)} for (d, c), t in seconds.items()]
        os.environ["QUERYTUNE_CACHE"] = tmp  # a fresh measurement, not this machine's cached one
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        lora = LoraConfig(r=preset["lora_r"], lora_alpha=preset["lora_alpha"], lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
        probe = pick_dtype(model, lora, probe_batch(sft_examples(rows, schema, tokenizer), tokenizer, args.batch_size), say=lambda _: None)
    fastest = min((r for r in results if not r["gradient_checkpointing"]), key=lambda r: r["s_per_step"])["dtype"]
    cpu = cpu_model()
    print(f"\nSFT step time, {Path(base).name}, batch {args.batch_size}, {args.rounds} x {args.steps} steps per setting, {len(rows):,} rows of {args.data}")
    print(f"CPU: {cpu}; {torch.get_num_threads()} threads; torch {torch.__version__}\n")
    print("| dtype | gradient checkpointing | s/step (median) | mean | min | max |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['s_per_step']:.2f} | {r['mean_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} |")
    print(f"\ndtype probe: fp32 {probe['fp32_s']:.2f} s, bf16 {probe['bf16_s']:.2f} s per forward+backward: picks {probe['dtype']} "
          f"({'the faster' if probe['dtype'] == fastest else 'not the faster'} in the timed steps: {fastest})")
    print(json.dumps({"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "base": base, "batch_size": args.batch_size,
                      "steps": args.steps, "rounds": args.rounds, "results": results, "probe": probe, "fastest": fastest}))


if __name__ == "__main__":
    main()
