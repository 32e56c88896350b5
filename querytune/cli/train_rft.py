"""`querytune train rft`: self-training and RFT on the click-evidence miner's edits (`querytune.train.rft`); registered
in `querytune.cli.train`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from querytune.cli.common import FORCE_HELP, Preset, UserError, prepare_out, user_errors, write_resolved
from querytune.cli.train_common import REPORT_TO_HELP, check_init, check_resume, evaluate, recipe_from, write_stage_card

out_console = Console()


def rft(
    init: Path = typer.Option(
        ..., "--init", help="Model folder to continue from (an SFT model); its own parses label the log texts."
    ),
    world: Path = typer.Option(
        ...,
        "--world",
        help="World folder: the log texts and their clicks come from the early part of its log.parquet, "
        "minus seed.jsonl; seed.jsonl joins the training rows.",
    ),
    index: Path = typer.Option(
        ..., "--index", help="Index folder (`querytune index build`): the searches the click evidence scores."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Model folder to write (one adapter: init and new LoRA combined, labels.jsonl, edits.csv, evidence.json, "
        "config, step log, card).",
    ),
    preset: Preset = typer.Option(
        "quick", "--preset", help="quick (4,000 log texts, 280 steps: ~15 min on 2 CPU cores) or full (8,000, 600)."
    ),
    config: Path = typer.Option(
        None,
        "--config",
        help="YAML with any field of querytune.train.rft.RFTRecipe (alpha, min_texts, text_margin, near, ...); "
        "the command line wins; an unknown key is an error.",
    ),
    texts: int = typer.Option(
        None,
        "--texts",
        help="Distinct early-log texts added to the seed (drawn by traffic, the same ones for every stage of one "
        "world and seed).",
    ),
    edits: str = typer.Option(
        None,
        "--edits",
        help="'mined' (the clicks' accepted edits, the default), 'none' (self-training: the model's own parses, "
        "the fair control), or an edit table to train on (an edits.csv you vetoed).",
    ),
    alpha: float = typer.Option(
        None, "--alpha", help="False-discovery rate of the pooled tests (Benjamini-Hochberg across every tested edit)."
    ),
    pool: bool = typer.Option(
        None, "--pool/--no-pool", help="--no-pool: the ablation that accepts any edit a single text's clicks prefer."
    ),
    abstain: bool = typer.Option(
        None,
        "--abstain/--no-abstain",
        help="--no-abstain: the ablation that scores a context whose result lists hold no logged business as 0 "
        "instead of unknown.",
    ),
    shuffle_clicks: bool = typer.Option(
        None, "--shuffle-clicks", help="The placebo: judge each text on another text's clicks."
    ),
    click_values: bool = typer.Option(
        None,
        "--click-values/--no-click-values",
        help="Also propose, on a text's free n-grams, the category or cuisine its users clicked (the closed loop's "
        "rounds: what an exploration bucket showed for a new word); the pooled test decides as for every edit.",
    ),
    max_steps: int = typer.Option(None, "--max-steps", help="SFT steps on the seed plus the labeled log texts."),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate of the new LoRA (cosine schedule with warm-up)."),
    bf16: bool = typer.Option(
        None, "--bf16/--no-bf16", help="bf16 autocast or fp32 (default: the dtype probe's pick on this machine)."
    ),
    max_minutes: float = typer.Option(
        None, "--max-minutes", help="Cap on training minutes (0: none; the steps are the budget)."
    ),
    greedy_from: Path = typer.Option(
        None,
        "--greedy-from",
        help="Reuse the greedy parses another run of the same --init wrote for the same texts (its OUT/greedy.jsonl) "
        "instead of parsing them again.",
    ),
    eval_data: Path = typer.Option(
        None, "--eval-data", help="Labeled file to evaluate on after training (metrics go into the model card)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Reuse OUT/labels.jsonl and continue training from the last checkpoint in OUT/checkpoints.",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    report_to: str = typer.Option("none", "--report-to", help=REPORT_TO_HELP),
    seed: int = typer.Option(0, "--seed", help="Random seed (text draw, mixture order, training)."),
) -> None:
    """RFT: SFT on the seed plus log texts labeled by --init's own parses,
    with the single-slot edits the clicks support (--edits none: self-training)."""
    import dataclasses

    from querytune.train.rft import PRESETS, train_rft

    with user_errors():
        cli = {
            "texts": texts,
            "edits": edits,
            "alpha": alpha,
            "pool": pool,
            "abstain": abstain,
            "shuffle_clicks": shuffle_clicks,
            "click_values": click_values,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "lr": lr,
            "bf16": bf16,
            "max_minutes": max_minutes,
        }
        resolved = recipe_from(PRESETS, preset, config, None, cli)
        if resolved.edits not in ("mined", "none") and not Path(resolved.edits).is_file():
            raise UserError(f"--edits: {resolved.edits!r} is neither 'mined', 'none' nor an edit table (edits.csv)")
        check_init(init)
        check_resume(out, resume)
        edit_table = Path(resolved.edits) if resolved.edits not in ("mined", "none") else None
        prepare_out(
            out,
            force,
            resume,
            inputs=[init, world, index, greedy_from, eval_data, edit_table, config],
            resumable=(out / "checkpoints").is_dir(),
        )
        out.mkdir(parents=True, exist_ok=True)
        config_out = {
            "command": "train rft",
            "init": str(init),
            "world": str(world),
            "index": str(index),
            "preset": preset,
            "seed": seed,
            **dataclasses.asdict(resolved),
        }
        write_resolved(config_out, out / "train_config.json")
        t0 = time.perf_counter()
        summary = train_rft(
            resolved,
            init,
            world,
            index,
            out,
            seed=seed,
            say=out_console.print,
            resume=resume,
            report_to=report_to,
            greedy_from=greedy_from,
        )
        write_resolved(config_out | {"dtype": summary["dtype"]}, out / "train_config.json")
        if eval_data:
            summary["metrics"] = evaluate(out, eval_data)
        summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    what = (
        "self-training (SFT on the model's own parses of the log texts)"
        if resolved.edits == "none"
        else "RFT (SFT on the model's own parses of the log texts with the edits the clicks support)"
    )
    write_stage_card(out, summary, dataclasses.asdict(resolved), what)
    out_console.print(
        f"{summary['stage']}: {summary['steps']} steps on {summary['log_texts']:,} log texts "
        f"({summary['texts_edited']:,} relabeled by the clicks), {summary['total_seconds']:.0f}s in all; model in {out}"
    )
