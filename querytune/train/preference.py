"""What DPO and GRPO share (`querytune.train.dpo`, `querytune.train.grpo`): both start from a tuned model folder (SFT),
merge its adapters into the base and train a new LoRA on top, so the adapter-free model is the init policy and
serves as the reference (KL anchor) of both losses; both save the init's adapter and the new one as one adapter
(`querytune.runtime.model.save_adapter`), so plain peft loads the tuned model.

The model reads and writes its init folder's format (`querytune.runtime.formats`), and the tuned folder keeps it.
Candidates, pairs (pairs.parquet) and audits hold canonical JSON whatever the format, so pair files and eval scripts
read alike: a completion becomes JSON where the parser returns it (`as_json`) and goes back to the model's format where
a trainer's dataset is built (`in_format`); GRPO's reward reads the policy's own completions in its format.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from querytune.runtime import formats
from querytune.runtime.card import write_card
from querytune.runtime.model import BASE_KEYS, MAX_NEW_TOKENS, ModelFolder, save_adapter
from querytune.schema import Schema
from querytune.train.sft import LORA_TARGETS, finish_checkpoints


# -- shared set-up -------------------------------------------------------------------------------------
def policy(init: Path, lora_r: int, lora_alpha: int):
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
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=[m for m in LORA_TARGETS if any(n.endswith(m) for n, _ in model.named_modules())]
        or "all-linear",
    )
    return tokenizer, model, lora, meta, schema


def save_stage(trainer, tokenizer, init: Path, out: Path, schema: Schema, meta: dict, stage: str) -> None:
    from querytune.runtime.model import save_model_meta

    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    base = {k: meta[k] for k in BASE_KEYS if k in meta}
    save_model_meta(
        out,
        schema,
        {
            "stage": stage,
            **base,
            "format": formats.folder_format(meta),
            "adapter": True,
            **save_adapter(out, base, init),  # init's adapters and the new one as one: what plain peft loads
            "max_new_tokens": meta.get("max_new_tokens", MAX_NEW_TOKENS),
        },
    )
    write_card(out)


def train_and_save(
    trainer,
    tokenizer,
    init: Path,
    out: Path,
    schema: Schema,
    meta: dict,
    stage: str,
    recipe,
    resume_from: str | None = None,
):
    """Train (StepLog prints instead of the default printer; from checkpoint `resume_from`; with the preset's step
    levers: `recipe.bf16_weights`, `recipe.compact_head`), save the folder; the result, seconds and step log."""
    from transformers import PrinterCallback

    from querytune.train.step import bf16_weights, labelled_positions_only

    trainer.remove_callback(PrinterCallback)
    if recipe.bf16 and recipe.bf16_weights:
        bf16_weights(trainer.model)
    start = time.perf_counter()
    with labelled_positions_only() if recipe.compact_head else contextlib.nullcontext():
        result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    finish_checkpoints(out, trainer)
    save_stage(trainer, tokenizer, init, out, schema, meta, stage)
    return result, seconds, [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
