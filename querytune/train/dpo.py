"""DPO on retrieval success: pairs of parses the clicks tell apart, TRL's DPOTrainer with an SFT term on the chosen one.

    querytune train dpo --init runs/sft --world runs/world --index runs/index --out runs/dpo
    querytune train dpo --init runs/sft --world runs/world --index runs/index --out runs/dpo --edits-from runs/rft

recipe (`DPORecipe`) -> pairs: with `edits_from`, the click-evidence miner's (`querytune.train.pairs.edit_pairs`: each
log text an accepted edit changed, the edited parse chosen, the greedy parse rejected); otherwise the init model's
parses of the most typed early-log texts, its rivals where it doubts a parse the clicks reject, scored in every context
the text was typed in (`querytune.train.pairs.build_pairs`) -> DPOTrainer (sigmoid loss plus `sft_weight` x the chosen
parse's likelihood, RPO) on a fresh LoRA over the merged init model, which is the reference -> the model folder.

Writes into OUT: pairs.parquet (and candidates.parquet when it sampled), the step log, checkpoints, the model. A
resumed run trains on the pairs it began with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from querytune.runtime import formats
from querytune.train.config import Recipe
from querytune.train.preference import policy, train_and_save
from querytune.train.sft import StepLog, checkpoint_args, report_args, start_or_resume
from querytune.train.targets import in_format


@dataclass(frozen=True)
class DPORecipe(Recipe):
    """What a DPO run reads. The pair-building fields apply when the pairs are sampled (no `edits_from`)."""

    queries: int = 2000  # distinct early-log texts parsed for pairs
    pick: str = "traffic"
    explore_below: float = 0.5  # explore texts whose greedy parse scores below this ...
    explore_confidence: float = 0.35  # ... and whose greedy parse the model doubts
    explore_with: str = "branch"
    constrained: bool = True
    k: int = 4  # rivals per explored text
    temperature: float = 1.0
    min_gap: float = 0.3  # reward gap a pair needs
    pairs_per_query: int = 2
    loss_type: str = "sigmoid"
    sft_weight: float = 0.5  # weight of the chosen parse's likelihood beside the DPO loss (RPO)
    epochs: float = 2.0
    max_steps: int = -1
    batch_size: int = 8
    lr: float = 1e-4
    beta: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    warmup_steps: int = 5
    bf16: bool = True
    max_minutes: float | None = 5.0
    save_steps: int = 50
    compact_head: bool = True  # the LM head only at scored positions (eval/bench_preference.py: 1.57x a step)
    bf16_weights: bool = False  # did not pay in DPO (1.02x alone)


PRESETS: dict[str, DPORecipe] = {
    # quick: <= 15 minutes on 2 CPU cores (greedy parses of 2,000 texts ~4 min, rivals ~2, training ~3)
    "quick": DPORecipe(),
    "full": DPORecipe(queries=8000, k=8, batch_size=16, warmup_steps=10, max_minutes=None),
    # on the click-evidence miner's pairs (--edits-from): six passes, no time cap; picked on seed 0's dev split against
    # two passes and lr 5e-4 (eval/RESULTS.md)
    "mined": DPORecipe(epochs=6.0, max_minutes=None),
}


def sampled_pairs(
    recipe: DPORecipe, init: Path, world: Path, index: Path, out: Path, seed: int, shuffle_clicks: bool, say=print
) -> dict[str, Any]:
    """Parse, explore and score early-log texts; write OUT/pairs.parquet and OUT/candidates.parquet; the counts."""
    from querytune.train.pairs import build_pairs, scored_candidates
    from querytune.train.reward import retrieval_reward
    from querytune.train.targets import click_targets, sample_candidates

    reward, schema = retrieval_reward(init, index)
    targets = click_targets(world, recipe.queries, seed=seed, shuffle_clicks=shuffle_clicks, pick=recipe.pick)
    if not targets:
        raise ValueError(f"{world}: no clicked queries in the early log outside the seed set")
    how = {"beam": "beams", "branch": "rivals (branch)"}.get(recipe.explore_with, "samples")
    say(f"DPO: {len(targets):,} logged queries, {recipe.k} {how} per explored query, from {init}")
    candidates, confidence = sample_candidates(
        init,
        targets,
        recipe.k,
        recipe.temperature,
        seed,
        say=say,
        reward=reward,
        explore_below=recipe.explore_below,
        explore_confidence=recipe.explore_confidence,
        explore_with=recipe.explore_with,
        constrained=recipe.constrained,
    )
    pairs = build_pairs(targets, candidates, reward, recipe.min_gap, recipe.pairs_per_query, schema=schema)
    pairs.to_parquet(out / "pairs.parquet", index=False)
    scored_candidates(targets, candidates, reward, confidence).to_parquet(out / "candidates.parquet", index=False)
    stats = {
        "queries": len(targets),
        "candidates": sum(len(set(c)) for c in candidates),
        "queries_with_pairs": int(pairs["query"].nunique()) if len(pairs) else 0,
        "searches": reward.search_calls,
    }
    say(
        f"{len(pairs):,} pairs from {stats['queries_with_pairs']:,} queries (gap >= {recipe.min_gap}); "
        f"{out / 'pairs.parquet'}"
    )
    return stats


def train_dpo(
    pairs: pd.DataFrame,
    init: Path,
    out: Path,
    recipe: DPORecipe,
    seed: int = 0,
    say=print,
    resume: bool = False,
    report_to: str = "none",
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(seed)
    tokenizer, model, lora, meta, schema = policy(init, recipe.lora_r, recipe.lora_alpha)
    fmt = formats.folder_format(meta)
    data = Dataset.from_list(
        [
            {
                "prompt": formats.prompt(fmt, schema, tokenizer, q),
                "chosen": in_format(schema, fmt, c),
                "rejected": in_format(schema, fmt, r),
            }
            for q, c, r in zip(pairs["query"], pairs["chosen"], pairs["rejected"])
        ]
    )
    longest = max(
        len(tokenizer(p + max(c, r, key=len)).input_ids)
        for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"])
    )
    last = start_or_resume(out, resume, say)
    log = StepLog(
        out / "steps.jsonl",
        say,
        recipe.max_minutes,
        extra={
            "margin": "rewards/margins",
            "accuracy": "rewards/accuracies",
            "logp_chosen": "logps/chosen",
            "logp_rejected": "logps/rejected",
        },
    )
    args = DPOConfig(
        **checkpoint_args(out, recipe.save_steps),
        max_steps=recipe.max_steps,
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.lr,
        lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_steps,
        beta=recipe.beta,
        max_length=longest + 2,
        logging_steps=1,
        # DPO plus a likelihood term on the chosen parse (RPO): keeps the chosen parses likely, not only relatively
        loss_type=[recipe.loss_type, "sft"] if recipe.sft_weight else [recipe.loss_type],
        loss_weights=[1.0, recipe.sft_weight] if recipe.sft_weight else None,
        **report_args(out, report_to),
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=recipe.bf16,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[log.callback],
    )
    result, seconds, steps = train_and_save(trainer, tokenizer, init, out, schema, meta, "dpo", recipe, last)
    return {
        "stage": "dpo",
        "init": str(init),
        "pairs": len(pairs),
        "steps": result.global_step,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, result.global_step), 2),
        "final_loss": steps[-1]["loss"] if steps else None,
        "margin_start": steps[0].get("margin") if steps else None,
        "margin_end": steps[-1].get("margin") if steps else None,
    }


def run_dpo(
    recipe: DPORecipe,
    init: Path,
    world: Path,
    index: Path,
    out: Path,
    pairs_file: Path | None = None,
    edits_from: Path | None = None,
    shuffle_clicks: bool = False,
    seed: int = 0,
    say=print,
    resume: bool = False,
    report_to: str = "none",
) -> dict[str, Any]:
    """Pairs (from `pairs_file`, the miner's edits in `edits_from`, or sampled), then DPO; the summary."""
    from querytune.runtime.model import ModelFolder
    from querytune.train.pairs import edit_pairs, load_pairs

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / "pairs.parquet").is_file():  # a resumed run trains on the pairs it began with
        stats = {"pairs_from": str(out / "pairs.parquet")}
    elif pairs_file:
        load_pairs(pairs_file).to_parquet(out / "pairs.parquet", index=False)
        stats = {"pairs_from": str(pairs_file)}
    elif edits_from:
        pairs = edit_pairs(edits_from, ModelFolder.open(init).version)
        if pairs.empty:
            raise ValueError(f"--edits-from {edits_from}: the miner accepted no edit there: no pairs to train on")
        pairs.to_parquet(out / "pairs.parquet", index=False)
        stats = {"pairs_from": f"edits of {edits_from}"}
        say(f"DPO: {len(pairs):,} pairs from the miner's edits in {edits_from}")
    else:
        stats = sampled_pairs(recipe, init, world, index, out, seed, shuffle_clicks, say)
    pairs = load_pairs(out / "pairs.parquet")
    summary = train_dpo(pairs, init, out, recipe, seed=seed, say=say, resume=resume, report_to=report_to) | stats
    return summary | {"total_seconds": round(time.perf_counter() - t0, 1)}
