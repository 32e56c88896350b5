"""Preference tuning on retrieval success: DPO on scored samples, and GRPO with the reward online.

Both start from a tuned model folder (SFT), merge its adapters into the base, and train a new LoRA on
top, so the adapter-free model is the SFT policy and serves as the reference (KL anchor) of both losses.
Training queries come from the earlier part of the click log, never from the labeled seed set: each is a
distinct query text with its position-debiased click evidence in up to 16 logged contexts (`click_targets`).
Choosing them and exploring their parses is `querytune.train.targets`; pairs and screening, `querytune.train.pairs`.

The model reads and writes its init folder's format (`querytune.runtime.formats`), and the tuned folder keeps it. Candidates,
pairs (pairs.parquet) and audits hold canonical JSON whatever the format, so pair files and eval scripts read alike:
a completion becomes JSON where the parser returns it (`as_json`) and goes back to the model's format where a
trainer's dataset is built (`in_format`); GRPO's reward reads the policy's own completions in its format.

    querytune train dpo  --init runs/sft --world runs/world --index runs/index --out runs/dpo
    querytune train grpo --init runs/sft --world runs/world --index runs/index --out runs/grpo

Both save checkpoints in out/checkpoints (`querytune.train.sft.checkpoint_args`) and continue a stopped run with `--resume`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from querytune.runtime import formats
from querytune.runtime.model import BASE_KEYS, MAX_NEW_TOKENS, ModelFolder, copy_adapter_chain
from querytune.schema import Schema
from querytune.train.reward import RetrievalReward
from querytune.train.sft import LORA_TARGETS, StepLog, checkpoint_args, finish_checkpoints, report_args, start_or_resume
from querytune.train.targets import in_format

# Step levers (`querytune.train.step`; eval/bench_preference.py, 2026-12-06): the LM head only at scored positions
# (DPO 1.57x alone); GRPO also samples with its adapters merged, its frozen weights in bf16 (1.41x together).
# bf16 weight storage did not pay in DPO (1.02x alone; 1.50x with the head against 1.57x without): off there.
STEP_LEVERS = {"compact_head": True, "bf16_weights": False}
GRPO_LEVERS = {"compact_head": True, "bf16_weights": True, "merged_sampling": True}
DPO_PRESETS: dict[str, dict[str, Any]] = {
    # quick: <= 15 minutes on 2 CPU cores: the constrained greedy parse of the 2,000 most typed texts of the early log
    # (~4 min in bf16), each scored in every city it was typed in; for those whose parse both misses the clicks (< 0.5)
    # and is one the model doubts (confidence < 0.35), its 4 nearest rivals (`Parser.branch`, ~2 min); pairs the
    # clicks can decide; two passes at a gentle lr (~3 min). Measured from the world seed-0 SFT: see docs/loop.md.
    # Tried and left out (docs/loop.md): 8 beams per doubted query (more pairs, 152 from 84 texts, 97 of them right against the
    # hidden needs) at lr 2e-4 fell by 0.030 (the chosen beams added filters by luck; slot precision 0.91 -> 0.82);
    # without filter-adding chosen parses (`adds_no_filter`) still -0.025 at lr 2e-4.
    "quick": {"queries": 2000, "pick": "traffic", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": True,
              "k": 4, "temperature": 1.0, "loss_type": "sigmoid", "sft_weight": 0.5, "min_gap": 0.3, "pairs_per_query": 2, "epochs": 2.0,
              "max_steps": -1, "batch_size": 8, "lr": 1e-4, "beta": 0.1, "lora_r": 16, "lora_alpha": 32, "warmup_steps": 5, "bf16": True,
              "max_minutes": 5.0, "save_steps": 50, **STEP_LEVERS},
    "full": {"queries": 8000, "pick": "traffic", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": True,
             "k": 8, "temperature": 1.0,
             "loss_type": "sigmoid", "sft_weight": 0.5, "min_gap": 0.3, "pairs_per_query": 2, "epochs": 2.0, "max_steps": -1,
             "batch_size": 16, "lr": 1e-4, "beta": 0.1, "lora_r": 16, "lora_alpha": 32, "warmup_steps": 10, "bf16": True, "max_minutes": None,
             "save_steps": 50, **STEP_LEVERS},
}
GRPO_PRESETS: dict[str, dict[str, Any]] = {
    # quick: <= 20 minutes on 2 CPU cores. Screening (~6 min): the greedy parse of 1,500 logged texts, the 4 rivals of
    # those it both misses and doubts; training only on texts where a rival beats the greedy parse in a way the clicks can decide (`screen`,
    # improvable), each mixed with an anchor query (`anchor_targets`, anchors 1.0). Then 4 of them x 8 samples per step
    # (eval/bench_preference.py: ~12-13 s/step with the levers, 15-20 before). Measured: see docs/loop.md. Without anchors the same run fell by 0.011 (categories
    # dropped, 60 test queries read as business names); with them +0.001 [-0.007, +0.009].
    # Screening keeps stop 12's random texts and free decoding (-0.000 [-0.007, +0.007] then): with the 1,500 most typed
    # texts and constrained screening, 46 texts were improvable and GRPO fell by 0.025 (slot recall 0.91 -> 0.85).
    # lr 2e-4 on 11 queries screened without the confidence filter fell to -0.016; lr 5e-4 with each sampled batch
    # used for 2 steps to -0.140 (slot recall 0.74).
    "quick": {"queries": 1500, "pick": "random", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": False,
              "screen_k": 4, "improvable": True, "anchors": 1.0, "min_gap": 0.3, "max_steps": 45, "num_iterations": 1, "num_generations": 8,
              "batch_size": 32, "temperature": 0.8,
              "lr": 1e-4, "beta": 0.04, "lora_r": 16, "lora_alpha": 32, "warmup_steps": 5, "bf16": True, "max_minutes": 11.0,
              "save_steps": 10, **GRPO_LEVERS},  # a step samples 32 parses (4 queries x 8): a checkpoint every ~2-3 min
    "full": {"queries": 8000, "pick": "traffic", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": True,
             "screen_k": 4, "improvable": True,
             "anchors": 1.0, "min_gap": 0.3, "max_steps": 600, "num_iterations": 1, "num_generations": 8, "batch_size": 64, "temperature": 0.8, "lr": 1e-4, "beta": 0.04,
             "lora_r": 16, "lora_alpha": 32, "warmup_steps": 10, "bf16": True, "max_minutes": None, "save_steps": 10, **GRPO_LEVERS},
}
NO_SIGNAL_WARN = 0.6  # GRPO: warn when this share of groups, averaged over the last 10 steps, has all-equal rewards


# -- shared set-up -------------------------------------------------------------------------------------
def _policy(init: Path, preset: dict[str, Any]):
    """Tokenizer, the init folder's merged model, a fresh LoRA config for it, its meta and schema."""
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer

    folder = ModelFolder.open(init)
    meta, schema = folder.meta, folder.schema
    tokenizer = AutoTokenizer.from_pretrained(init)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = folder.merged(torch.float32)
    lora = LoraConfig(r=preset["lora_r"], lora_alpha=preset["lora_alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=[m for m in LORA_TARGETS if any(n.endswith(m) for n, _ in model.named_modules())] or "all-linear")
    return tokenizer, model, lora, meta, schema


def _save(trainer, tokenizer, init: Path, out: Path, schema: Schema, meta: dict, stage: str) -> None:
    from querytune.runtime.model import save_model_meta

    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    chain = copy_adapter_chain(init, out)
    save_model_meta(out, schema, {"stage": stage, **{k: meta[k] for k in BASE_KEYS if k in meta}, "format": formats.folder_format(meta),
                                  "adapter": True, "init_adapters": chain, "init": str(init), "max_new_tokens": meta.get("max_new_tokens", MAX_NEW_TOKENS)})


def _train_and_save(trainer, tokenizer, init: Path, out: Path, schema: Schema, meta: dict, stage: str, preset: dict[str, Any],
                    resume_from: str | None = None):
    """Train (StepLog prints instead of the default printer; from checkpoint `resume_from`; with the preset's step
    levers), save the folder; the result, seconds and step log."""
    from transformers import PrinterCallback

    from querytune.train.step import bf16_weights, labelled_positions_only

    trainer.remove_callback(PrinterCallback)
    if preset.get("bf16") and preset.get("bf16_weights"):
        bf16_weights(trainer.model)
    start = time.perf_counter()
    with labelled_positions_only() if preset.get("compact_head") else contextlib.nullcontext():
        result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    finish_checkpoints(out, trainer)
    _save(trainer, tokenizer, init, out, schema, meta, stage)
    return result, seconds, [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


# -- DPO -----------------------------------------------------------------------------------------------
def train_dpo(pairs: pd.DataFrame, init: Path, out: Path, preset: dict[str, Any], seed: int = 0, say=print,
              resume: bool = False, report_to: str = "none") -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(seed)
    tokenizer, model, lora, meta, schema = _policy(init, preset)
    fmt = formats.folder_format(meta)
    data = Dataset.from_list([{"prompt": formats.prompt(fmt, schema, tokenizer, q), "chosen": in_format(schema, fmt, c),
                               "rejected": in_format(schema, fmt, r)} for q, c, r in zip(pairs["query"], pairs["chosen"], pairs["rejected"])])
    longest = max(len(tokenizer(p + max(c, r, key=len)).input_ids) for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"]))
    last = start_or_resume(out, resume, say)
    log = StepLog(out / "steps.jsonl", say, preset.get("max_minutes"),
                  extra={"margin": "rewards/margins", "accuracy": "rewards/accuracies", "logp_chosen": "logps/chosen",
                         "logp_rejected": "logps/rejected"})
    args = DPOConfig(
        **checkpoint_args(out, preset), max_steps=preset["max_steps"], num_train_epochs=preset["epochs"],
        per_device_train_batch_size=preset["batch_size"], learning_rate=preset["lr"], lr_scheduler_type="cosine",
        warmup_steps=preset["warmup_steps"], beta=preset["beta"], max_length=longest + 2, logging_steps=1,
        # DPO plus a likelihood term on the chosen parse (RPO): keeps the chosen parses likely, not only relatively
        loss_type=[preset.get("loss_type", "sigmoid"), "sft"] if preset.get("sft_weight") else [preset.get("loss_type", "sigmoid")],
        loss_weights=[1.0, preset["sft_weight"]] if preset.get("sft_weight") else None,
        **report_args(out, report_to), seed=seed, use_cpu=not torch.cuda.is_available(), bf16=preset.get("bf16", False),
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                         callbacks=[log.callback])
    result, seconds, steps = _train_and_save(trainer, tokenizer, init, out, schema, meta, "dpo", preset, last)
    return {"stage": "dpo", "init": str(init), "pairs": len(pairs), "steps": result.global_step, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, result.global_step), 2), "final_loss": steps[-1]["loss"] if steps else None,
            "margin_start": steps[0].get("margin") if steps else None, "margin_end": steps[-1].get("margin") if steps else None}


# -- GRPO ----------------------------------------------------------------------------------------------
def train_grpo(targets: list[dict], reward: RetrievalReward, init: Path, out: Path, preset: dict[str, Any], seed: int = 0,
               say=print, resume: bool = False, report_to: str = "none") -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig

    from querytune.train.step import SamplingGRPOTrainer

    torch.manual_seed(seed)
    tokenizer, model, lora, meta, schema = _policy(init, preset)
    fmt = formats.folder_format(meta)  # the policy writes its completions in it; the `fmt` column tells the reward
    data = Dataset.from_list([{"prompt": formats.prompt(fmt, schema, tokenizer, t["query"]), "query": t["query"], "user_city": t["user_city"],
                               "timestamp": t["timestamp"], "gains": json.dumps(t["gains"]),
                               "contexts": json.dumps(t.get("contexts") or [t]), "fmt": fmt} for t in targets])
    last = start_or_resume(out, resume, say)
    recent: list[float] = []
    warned: list[int] = []

    def watch(row: dict) -> str | None:
        if "no_signal" not in row:
            return None
        recent.append(row["no_signal"])
        window = recent[-10:]
        if len(recent) >= 10 and sum(window) / len(window) > NO_SIGNAL_WARN and not warned:
            warned.append(row["step"])
            return (f"warning: {sum(window) / len(window):.0%} of groups over the last 10 steps had equal rewards (no learning "
                    f"signal): raise --temperature or --num-generations, or start from a weaker model")
        return None

    log = StepLog(out / "steps.jsonl", say, preset.get("max_minutes"),
                  extra={"reward": "reward", "reward_std": "reward_std", "no_signal": "frac_reward_zero_std", "kl": "kl",
                         "completion_len": "completions/mean_length", "sampling_s": "sampling_seconds"}, watch=watch,
                  quiet={"sampling_s"})
    args = GRPOConfig(
        **checkpoint_args(out, preset), max_steps=preset["max_steps"], per_device_train_batch_size=preset["batch_size"],
        num_generations=preset["num_generations"], max_completion_length=int(meta.get("max_new_tokens", MAX_NEW_TOKENS)),
        # each batch of sampled groups serves `num_iterations` optimizer steps (clipped ratio, as in PPO): sampling
        # dominates a step on CPU, so reusing it learns more per minute
        num_iterations=int(preset.get("num_iterations", 1)),
        temperature=preset["temperature"], top_k=0, top_p=1.0, learning_rate=preset["lr"], lr_scheduler_type="constant_with_warmup",
        warmup_steps=preset["warmup_steps"], beta=preset["beta"], logging_steps=1, **report_args(out, report_to), seed=seed,
        use_cpu=not torch.cuda.is_available(), bf16=preset.get("bf16", False), disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=bool(preset.get("use_vllm", False)), vllm_mode="colocate",
    )
    trainer = SamplingGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=lora, callbacks=[log.callback], merged_sampling=bool(preset.get("merged_sampling")))
    result, seconds, steps = _train_and_save(trainer, tokenizer, init, out, schema, meta, "grpo", preset, last)
    head, tail = steps[: max(1, len(steps) // 10)], steps[-max(1, len(steps) // 10):]
    mean = lambda rows, k: round(sum(r.get(k, 0.0) for r in rows) / len(rows), 4)  # noqa: E731
    return {"stage": "grpo", "init": str(init), "queries": len(targets), "steps": result.global_step,
            "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(1, result.global_step), 2),
            "reward_start": mean(head, "reward"), "reward_end": mean(tail, "reward"),
            "no_signal_start": mean(head, "no_signal"), "no_signal_end": mean(tail, "no_signal"),
            "kl_end": mean(tail, "kl"), "no_signal_warning_at_step": warned[0] if warned else None,
            "reward_calls": reward.calls, "searches": reward.search_calls}
