r"""SFT: teach a compact causal LM (LoRA) to map a query to the schema's JSON parse.

    querytune train sft --data runs/world/seed.jsonl --out runs/sft \
        [--schema data/schema.yaml] [--preset quick] [--resume]

setup (labeled rows -> prompt/completion pairs) -> TRL SFTTrainer with a peft LoRA and completion-only
loss -> save adapter + tokenizer + schema + resolved config + step log + model card. Intents the schema
declares but the data never shows get their description as a training row, so they stay reachable. The
folder's schema adds the aliases its labels support (`querytune.train.aliases`), so grounding keeps nicknames.
The budget is optimizer steps x batch size; fp32 or bf16 is chosen by a measurement on the machine.
Checkpoints go to out/checkpoints every `save_steps` (the last two kept, removed once the schedule completes);
`--resume` continues a stopped run from the last one, its step log kept up to that step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from querytune.labeled import LabeledRow
from querytune.runtime.card import write_card
from querytune.runtime.formats import DEFAULT_FORMAT, completion, folder_format, prompt
from querytune.runtime.model import BASE_KEYS, ModelFolder, base_path, base_record, save_adapter, save_model_meta
from querytune.schema import Schema
from querytune.train.aliases import merge_aliases, mine_aliases
from querytune.train.config import Recipe


@dataclass(frozen=True)
class SFTRecipe(Recipe):
    """What an SFT run reads. The budget is the optimizer steps and batch; `max_minutes` is only a cap against a
    runaway. The step's levers (`querytune.train.step`; eval/bench_sft.py times each; what was tried and left out is in
    eval/RESULTS.md, "Training speed"): one padding-free row per batch, the LM head only where the loss reads, no LoRA
    dropout, bf16 storage of the frozen weights under bf16 autocast, attention within each packed sequence."""

    max_steps: int = 720  # -1: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 8
    lr: float = 1.5e-3  # few steps want a high LoRA learning rate (RESULTS, "SFT presets")
    lora_r: int = 32
    lora_alpha: int = 64
    warmup_steps: int = 16
    bf16: bool | str = "auto"  # "auto": measured once per machine (`querytune.train.step.pick_dtype`)
    gradient_checkpointing: bool = False  # recomputes activations to save memory a 135M model does not need
    max_minutes: float | None = 75.0  # a cap against a runaway: 720 steps at 6 s a step
    save_steps: int = 100
    padding_free: bool = True
    completion_logits: bool = True
    lora_dropout: float = 0.0
    bf16_weights: bool = True
    attention: str = "packed"  # "packed" needs padding_free; "sdpa" or "eager" otherwise


PRESETS: dict[str, SFTRecipe] = {
    # quick: 720 steps of batch 8 (what ~11.5 min of 0.95 s steps hold here), ~1.35 passes over SGD-sized data
    # (4,269 rows), ~2.9 over a 2,000-row world seed (RESULTS, "SFT on real data")
    "quick": SFTRecipe(),
    # full: four passes (2,136 steps on the 4,269-row SGD training split; 4.5 passes took 40 min for no gain; RESULTS,
    # "SFT on real data")
    "full": SFTRecipe(max_steps=-1, epochs=4.0, lr=1e-3, warmup_steps=20, max_minutes=120.0, save_steps=200),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sft_examples(rows: list[LabeledRow], schema: Schema, tokenizer, fmt: str = DEFAULT_FORMAT) -> list[dict[str, str]]:
    """Prompt/completion strings in format `fmt` (`querytune.runtime.formats`);
    the completion ends with the tokenizer's end-of-turn token."""
    seen = {r.intent for r in rows}
    pairs = [(r.text, {"intent": r.intent, "slots": r.slots}) for r in rows]
    pairs += [
        (i.description.lower(), {"intent": i.name, "slots": {}})
        for i in schema.intents.values()
        if i.name not in seen and i.description
    ] * 2  # intents the data never shows, from their descriptions
    return [
        {"prompt": prompt(fmt, schema, tokenizer, text), "completion": completion(fmt, label) + tokenizer.eos_token}
        for text, label in pairs
    ]


def clock(seconds: float) -> str:
    """A duration at a glance, as a progress line's ETA shows it.

    >>> clock(42.4), clock(185), clock(3720)
    ('42s', '3m05s', '1h02m')
    """
    s = round(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class StepLog:
    """TrainerCallback body: one JSONL line and one dense progress line per optimisation step, ending with the
    run's ETA (the steps left at this run's pace so far, or the time budget left if that ends it sooner)."""

    def __init__(
        self,
        path: Path,
        say,
        max_minutes: float | None = None,
        extra: dict[str, str] | None = None,
        watch=None,
        quiet: set[str] = frozenset(),
    ):
        """`extra`: column name -> trainer log key, logged and printed when present (`quiet` ones only logged).
        `watch(row)` sees every row (e.g. to warn about a trend) and may return a line to print."""
        from transformers import TrainerCallback

        self.path, self.say, self.t0, self.tokens = path, say, time.perf_counter(), 0
        self.start, self.max_seconds = self.t0, 60 * max_minutes if max_minutes else None
        self.extra, self.watch, self.quiet = extra or {}, watch, quiet
        self.first: tuple[int, float] | None = None  # (step, time) of this run's first logged step, the ETA's origin
        log = self

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if not logs or "loss" not in logs:
                    return
                now = time.perf_counter()
                tokens = state.num_input_tokens_seen or 0
                row = {
                    "step": state.global_step,
                    "loss": round(float(logs["loss"]), 5),
                    "lr": float(logs.get("learning_rate", 0.0)),
                    "seconds": round(now - log.t0, 2),
                    "tokens_per_s": round((tokens - log.tokens) / max(now - log.t0, 1e-9), 1),
                }
                row |= {name: round(float(logs[key]), 5) for name, key in log.extra.items() if key in logs}
                log.t0, log.tokens = now, tokens
                with open(log.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                shown = "".join(
                    f"  {name} {row[name]:.3f}" for name in log.extra if name in row and name not in log.quiet
                )
                log.say(
                    f"step {row['step']}/{state.max_steps}  loss {row['loss']:.4f}{shown}  lr {row['lr']:.2e}  "
                    f"{row['seconds']:.1f}s/step"
                    + (f"  {row['tokens_per_s']:.0f} tok/s" if row["tokens_per_s"] else "")
                    + log.eta(state.global_step, state.max_steps, now, row["seconds"])
                )
                if log.watch and (line := log.watch(row)):
                    log.say(line)
                if log.max_seconds and now - log.start > log.max_seconds:
                    log.say(
                        f"time budget of {log.max_seconds / 60:.0f} min reached: stopping at step {state.global_step}"
                    )
                    control.should_training_stop = True
                    control.should_save = True  # a checkpoint, so `--resume` can finish the schedule

        self.callback = _Callback()

    def eta(self, step: int, max_steps: int, now: float, step_seconds: float) -> str:
        """`  eta 3m05s` for the steps left, or "" after the last."""
        self.first = self.first or (step, now)
        done, since = step - self.first[0], now - self.first[1]
        left = (max_steps - step) * (since / done if done else step_seconds)
        if self.max_seconds:
            left = min(left, max(0.0, self.max_seconds - (now - self.start)))
        return f"  eta {clock(left)}" if step < max_steps else ""


def start_or_resume(out: Path, resume: bool, say=print) -> str | None:
    """The checkpoint `--resume` continues from (the last in out/checkpoints); without `resume`, a fresh start that
    clears old checkpoints and the step log. Resuming keeps the step log up to the checkpoint's step."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints, log = out / "checkpoints", out / "steps.jsonl"
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a stale checkpoint must never be resumed by a later run
        log.unlink(missing_ok=True)
        return None
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {checkpoints} (a completed run removes its checkpoints); run without --resume"
        )
    step = int(Path(last).name.rsplit("-", 1)[1])
    if log.is_file():  # steps after the checkpoint are trained again
        log.write_text(
            "".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["step"] <= step)
        )
    say(f"resuming from step {step} ({last})")
    return last


def checkpoint_args(out: Path, save_steps: int) -> dict[str, Any]:
    """Trainer arguments for checkpoints in out/checkpoints every `save_steps` steps, the last two kept."""
    return {
        "output_dir": str(out / "checkpoints"),
        "save_strategy": "steps",
        "save_steps": int(save_steps),
        "save_total_limit": 2,
    }


def report_args(out: Path, report_to: str) -> dict[str, Any]:
    """The trainer's `report_to`; TensorBoard writes into out/runs, which outlives out/checkpoints (the trainer's
    output_dir, removed when the schedule completes)."""
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "runs")
    return {"report_to": report_to}


def finish_checkpoints(out: Path, trainer) -> None:
    """Remove the checkpoints once the schedule completed (a run stopped early, e.g. by its time cap, keeps them)."""
    if trainer.state.global_step >= trainer.state.max_steps:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def train_sft(
    rows: list[LabeledRow],
    schema: Schema,
    out: Path,
    base: str | None,
    recipe: SFTRecipe,
    seed: int = 0,
    say=print,
    init: Path | None = None,
    resume: bool = False,
    fmt: str = DEFAULT_FORMAT,
    report_to: str = "none",
    stage: str = "sft",
) -> dict[str, Any]:
    """Train and save; returns a summary (steps, seconds, final loss, token lengths, dtype). `stage`: what the folder
    records it is (`querytune.train.rft` trains through here too). `fmt`: the format the
    model reads and writes (`querytune.runtime.formats`). `init`: a model folder to continue from (its adapters merged,
    a new LoRA on top, its format kept) instead of the bare base. The folder's schema
    carries the aliases its labels support (`querytune.train.aliases`), plus those of `init`. `resume`: continue from
    the last checkpoint in out/checkpoints (`start_or_resume`). `report_to`: transformers' logging integrations
    (tensorboard, ...) besides out/steps.jsonl."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from querytune.train.step import CompletionSFTTrainer, bf16_weights, packed_batch, pick_dtype

    torch.manual_seed(seed)
    init_folder = ModelFolder.open(init) if init else None
    init_meta, init_schema = (init_folder.meta, init_folder.schema) if init_folder else ({}, schema)
    fmt = folder_format(init_meta) if init else fmt
    if init:
        base_dir, base_meta = base_path(init_meta), {k: init_meta[k] for k in BASE_KEYS if k in init_meta}
    else:
        base_dir, base_meta = base_record(base)
    tokenizer = AutoTokenizer.from_pretrained(init or base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = sft_examples(rows, schema, tokenizer, fmt)
    schema = merge_aliases(schema, {n: s.aliases for n, s in init_schema.slots.items()})  # the init's aliases stay
    mined = mine_aliases(rows, schema)  # and those this stage's labels support join them in the folder's schema
    schema = merge_aliases(schema, mined)
    lengths = [len(tokenizer(e["prompt"] + e["completion"]).input_ids) for e in examples]
    completion_lengths = [len(tokenizer(e["completion"], add_special_tokens=False).input_ids) for e in examples]
    model = (
        init_folder.merged(torch.float32)
        if init_folder
        else AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    )
    if recipe.attention == "packed" and not recipe.padding_free:
        raise ValueError("attention 'packed' needs padding_free: it reads the sequences of one padding-free row")
    model.set_attn_implementation(recipe.attention)
    lora = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        task_type="CAUSAL_LM",
        target_modules=[m for m in LORA_TARGETS if any(n.endswith(m) for n, _ in model.named_modules())]
        or "all-linear",
    )
    probe = None
    if recipe.bf16 == "auto":
        probe = pick_dtype(
            model,
            lora,
            packed_batch(examples, tokenizer, recipe.batch_size, seed),
            say=say,
            weights_in_bf16=recipe.bf16_weights,
        )
    bf16 = probe["dtype"] == "bf16" if probe else bool(recipe.bf16)
    out.mkdir(parents=True, exist_ok=True)
    last = start_or_resume(out, resume, say)
    padding_free, completion_logits = recipe.padding_free, recipe.completion_logits
    counts = (
        {"step_tokens": "step_tokens", "step_targets": "step_targets", "step_sum_sq": "step_sum_sq"}
        if completion_logits
        else {}
    )
    step_log = StepLog(out / "steps.jsonl", say, recipe.max_minutes, extra=counts, quiet=set(counts))
    args = SFTConfig(
        **checkpoint_args(out, recipe.save_steps),
        max_steps=recipe.max_steps,
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.lr,
        lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_steps,
        logging_steps=1,
        **report_args(out, report_to),
        seed=seed,
        # padding-free does not truncate (TRL asks for max_length None); the longest example fits either way
        max_length=None if padding_free else max(lengths) + 1,
        padding_free=padding_free,
        completion_only_loss=True,
        packing=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        activation_checkpointing=recipe.gradient_checkpointing,  # TRL turns it on by default
        include_num_input_tokens_seen="all",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # not train_sampling_strategy="group_by_length": measured 13% faster per step, but batches of one length
        # reweight the completion-only loss toward short parses and the model learned to stop after the
        # first slot (world seed 0 test: slot F1 0.727 against 0.870, 2026-11-24). Grouping by prompt length only,
        # within mega-batches, would still do so: prompt and completion lengths correlate (r 0.58, world seed).
    )
    trainer = (CompletionSFTTrainer if completion_logits else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[step_log.callback],
    )
    if bf16 and recipe.bf16_weights:
        bf16_weights(trainer.model)
    trainer.remove_callback(PrinterCallback)  # StepLog prints one dense line per step instead
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    finish_checkpoints(out, trainer)
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    max_new = int(max(completion_lengths) * 1.5) + 8
    summary = {
        "stage": stage,
        "format": fmt,
        "base": base or "smollm2-135m-instruct",
        "base_path": base_dir,
        "examples": len(examples),
        "steps": result.global_step,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, result.global_step), 2),
        "final_loss": json.loads((out / "steps.jsonl").read_text().splitlines()[-1])["loss"],
        "tokens_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_max": max(lengths),
        "completion_tokens_mean": round(sum(completion_lengths) / len(completion_lengths), 1),
        "max_new_tokens": max_new,
        "schedule_steps": trainer.state.max_steps,
        "dtype": "bf16" if bf16 else "fp32",
        "dtype_probe": probe,
        "gradient_checkpointing": bool(args.activation_checkpointing),
        "mined_aliases": sum(map(len, mined.values())),
    }
    mined_all = {
        n: init_meta.get("mined_aliases", {}).get(n, {}) | mined.get(n, {})
        for n in sorted({*init_meta.get("mined_aliases", {}), *mined})
    }
    meta = {
        "stage": stage,
        **base_meta,
        "format": fmt,
        "adapter": True,
        "max_new_tokens": max_new,
        "mined_aliases": mined_all,
    }
    meta |= save_adapter(out, base_meta, init)  # one adapter on the base, init's folded in: what plain peft loads
    save_model_meta(out, schema, meta)
    write_card(out)  # the CLI adds the run's facts
    return summary
