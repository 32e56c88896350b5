"""Helpers the `querytune train` commands share: preset and config resolution, the checks made before any work, the
evaluation after SFT, and the model card (`querytune.runtime.card`) and summary written into each model folder."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from querytune.cli.common import UserError, load_config

REPORT_TO_HELP = (
    "Where TRL also logs the training curves (beside OUT/steps.jsonl): none, tensorboard (needs tensorboard installed; "
    "`tensorboard --logdir OUT`), or any other of transformers' `report_to` integrations."
)


def recipe_from(presets: dict, preset: str, config: Path | None, file_cfg: dict | None, cli: dict):
    """The stage's preset (a `querytune.train.config.Recipe`) with the config file's keys, then the options given;
    an unknown key in the file is a one-line error naming the file and the known keys. A max_minutes of 0 is None
    (no cap)."""
    if preset not in presets:
        raise UserError(f"--preset: {preset!r} is not one of {', '.join(presets)}")
    try:
        recipe = presets[preset].resolve(load_config(config) if file_cfg is None else file_cfg, "config key")
    except ValueError as e:
        raise UserError(f"--config {config}: {e}") from None
    recipe = recipe.resolve(cli)
    if getattr(recipe, "max_minutes", None) == 0:
        recipe = dataclasses.replace(recipe, max_minutes=None)
    from querytune.train.targets import EXPLORE_WITH, PICKS

    if getattr(recipe, "explore_with", "sample") not in EXPLORE_WITH:
        raise UserError(f"--explore-with: {recipe.explore_with!r} is not one of {', '.join(EXPLORE_WITH)}")
    if getattr(recipe, "pick", "traffic") not in PICKS:
        raise UserError(f"--pick: {recipe.pick!r} is not one of {', '.join(PICKS)}")
    return recipe


def check_resume(out: Path, resume: bool) -> None:
    """`--resume` with nothing to resume fails before any sampling or scoring, not after."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume and not ((out / "checkpoints").is_dir() and get_last_checkpoint(str(out / "checkpoints"))):
        raise UserError(
            f"--resume: no checkpoint in {out / 'checkpoints'} (a completed run removes its checkpoints); "
            "run without --resume"
        )


def check_init(init: Path) -> None:
    from querytune.runtime.model import ModelFolder

    folder = ModelFolder.open(init)  # names the folder when it is not a model
    if not folder.meta.get("adapter"):  # a stage adds a LoRA on the init's base, and a merged export records none
        raise UserError(
            f"--init {init}: a merged folder (querytune export) cannot be trained further; "
            "give the adapter folder it was exported from"
        )


def evaluate(model_dir: Path, data: Path) -> dict:
    from querytune.evaluation.parse_eval import parse_metrics
    from querytune.labeled import load_labeled
    from querytune.runtime.generate import Parser

    parser = Parser(model_dir)
    rows, _ = load_labeled(data, parser.schema)
    t = time.perf_counter()
    preds = parser.parse([r.text for r in rows])
    metrics = parse_metrics([{"intent": r.intent, "slots": r.slots} for r in rows], [p.parse for p in preds])
    metrics["queries_per_second"] = round(len(rows) / (time.perf_counter() - t), 2)
    return metrics


def write_sft_card(out: Path, summary: dict, data: Path, schema, resolved: dict, metrics: dict | None) -> None:
    from querytune.runtime.card import write_card

    lines = [
        "- stage: SFT (LoRA, TRL SFTTrainer, completion-only loss)",
        f"- base: {summary['base']}",
        f"- data: {data} ({summary['examples']} training examples)",
        f"- schema: {schema.name} (version {schema.version})",
        f"- config: {json.dumps(resolved)}",
        f"- steps: {summary['steps']} of {summary['schedule_steps']}, {summary['train_seconds']} s "
        f"({summary['seconds_per_step']} s/step in {summary['dtype']}), final loss {summary['final_loss']}",
        f"- tokens per example: mean {summary['tokens_mean']}, max {summary['tokens_max']} (completion mean "
        f"{summary['completion_tokens_mean']})",
    ]
    if metrics:
        keys = (
            "n",
            "intent_accuracy",
            "slot_precision",
            "slot_recall",
            "slot_f1",
            "frame_exact_match",
            "validity",
            "queries_per_second",
        )
        lines += [
            "",
            "## Metrics",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
            "| " + " | ".join(str(metrics[k]) for k in keys) + " |",
        ]
    write_card(out, lines)
    (out / "summary.json").write_text(json.dumps(summary | ({"metrics": metrics} if metrics else {}), indent=2) + "\n")


def write_stage_card(out: Path, summary: dict, resolved: dict, what: str) -> None:
    from querytune.runtime.card import write_card

    lines = [
        f"- stage: {what}",
        f"- init: {summary['init']}",
        f"- config: {json.dumps(resolved)}",
    ]
    lines += [f"- {k}: {v}" for k, v in summary.items() if k not in ("stage", "init")]
    write_card(out, lines)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
