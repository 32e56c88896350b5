"""Model folders travel: the base is recorded by name and content hash, model_version never depends on a path,
and `querytune export` makes a folder that needs neither base nor cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from querytune.cli import app
from querytune.runtime.formats import IDENTITY
from querytune.runtime.model import ModelFolder

QUERIES = ["cheap thai near me", "24h plumber austin", "dentist"]


def predict(model: Path) -> tuple[int, list[dict] | str]:
    result = CliRunner().invoke(app, ["predict", "--model", str(model), *QUERIES])
    return (
        result.exit_code,
        [json.loads(line) for line in result.stdout.splitlines()] if result.exit_code == 0 else result.output,
    )


def test_a_copied_model_predicts_the_same_under_a_fresh_cache(tiny_base, small_world_master, tmp_path, monkeypatch):
    base = tmp_path / "tiny-base"
    shutil.copytree(tiny_base, base)
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("QUERYTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "train" / "sft"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "sft",
            "--data",
            str(small_world_master / "seed.jsonl"),
            "--out",
            str(model),
            "--base",
            str(base),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--no-bf16",
            "--lora-r",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = ModelFolder.open(model).meta
    assert (
        meta["base"] == "tiny-base" and len(meta["base_sha256"]) == 64
    )  # a name and a content hash, not a path to load
    code, before = predict(model)
    assert code == 0, before
    assert {p["model_version"] for p in before} == {ModelFolder.open(model).version}

    # another machine: the folder elsewhere, the training cache gone, a fresh cache, the base no longer where it was
    moved = tmp_path / "elsewhere" / "sft"
    shutil.copytree(model, moved)
    shutil.rmtree(model)
    (tmp_path / "cache").rename(tmp_path / "cache-away")
    fresh = tmp_path / "fresh-cache"
    monkeypatch.setenv("QUERYTUNE_MODEL_CACHE", str(fresh))
    base.rename(tmp_path / "base-away")
    code, output = predict(moved)
    assert code == 2 and len(output.strip().splitlines()) == 1, output  # one line naming where to put the base
    assert str(fresh / "bases" / "tiny-base") in output and "QUERYTUNE_MODEL_CACHE" in output

    shutil.copytree(tmp_path / "base-away", fresh / "bases" / "tiny-base")
    code, after = predict(moved)
    assert code == 0, after
    assert after == before  # the same parses, confidences and model_version


def test_a_folder_that_records_an_absolute_base_path_still_loads_where_it_exists(tiny_model, tiny_base, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_model, old)
    meta = json.loads((old / "querytune.json").read_text())
    for key in ("base_sha256", "base_path"):
        meta.pop(key, None)
    (old / "querytune.json").write_text(json.dumps(meta | {"base": str(tiny_base)}))  # as folders were written before
    code, old_preds = predict(old)
    _, new_preds = predict(tiny_model)
    assert code == 0, old_preds
    assert [p["parse"] for p in old_preds] == [p["parse"] for p in new_preds]
    assert (
        ModelFolder.open(old).version == ModelFolder.open(tiny_model).version
    )  # the same base content and adapter: the same version


def test_export_writes_a_merged_folder_that_loads_with_no_cache(tiny_model, tmp_path, monkeypatch):
    work = tmp_path / "model"
    shutil.copytree(tiny_model, work)
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", "--model", str(work), "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = ModelFolder.open(out).meta
    assert (
        meta["adapter"] is False
        and "base" not in meta
        and meta["exported_from"]["model_version"] == ModelFolder.open(work).version
    )
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    _, before = predict(work)
    shutil.rmtree(work)  # the adapters are gone and the cache is an empty path: the export alone must do
    monkeypatch.setenv("QUERYTUNE_MODEL_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setattr(
        "querytune.runtime.model.resolve_base",
        lambda *a: (_ for _ in ()).throw(AssertionError("an export needs no base")),
    )
    code, after = predict(out)
    assert code == 0, after
    assert [(p["parse"], p["valid"]) for p in after] == [(p["parse"], p["valid"]) for p in before]
    assert not (tmp_path / "no-cache").exists()


def test_model_version_follows_the_schema_and_the_format(tiny_model, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    version = ModelFolder.open(tiny_model).version
    assert ModelFolder.open(copy).version == version
    meta = json.loads((copy / "querytune.json").read_text())
    monkeypatch.setitem(IDENTITY, meta["format"], "querytune-format-next")  # what the model reads or writes changed
    assert ModelFolder.open(copy).version != version
    monkeypatch.undo()
    (copy / "querytune.json").write_text(
        json.dumps(meta | {"format": "json"})
    )  # the same weights read as the other format
    assert ModelFolder.open(copy).version != version
    (copy / "querytune.json").write_text(json.dumps(meta))
    schema = (copy / "schema.yaml").read_text()
    (copy / "schema.yaml").write_text(schema.replace("description: ", "description: a ", 1))
    assert (
        ModelFolder.open(copy).schema.version != ModelFolder.open(tiny_model).schema.version
        and ModelFolder.open(copy).version != version
    )


def test_a_model_folder_is_read_and_hashed_once_along_the_serving_path(tiny_model, monkeypatch):
    """The server and the Ray engine open a folder once and hand the object on: the parser behind the backend
    neither re-reads querytune.json nor re-hashes the weights, and a replica gets the version with the
    pickled folder."""
    import pickle

    import querytune.runtime.model as model_module
    from querytune.runtime.backends import load_backend

    folder = ModelFolder.open(tiny_model)
    version = folder.version
    hash_files = model_module._files_sha256

    def no_rehash(files):  # the base's weights may be checked (base_path); the folder's own are hashed once, above
        if any(name.startswith(str(tiny_model)) for name, _, _ in files):
            pytest.fail(f"the folder's weights were hashed again: {files}")
        return hash_files(files)

    monkeypatch.setattr(model_module, "_files_sha256", no_rehash)
    monkeypatch.setattr(
        ModelFolder, "open", classmethod(lambda cls, f: f if isinstance(f, cls) else pytest.fail(f"{f} was read again"))
    )
    backend = load_backend("transformers", folder, batch_size=4)
    assert backend.parser.folder is folder and backend.model_version == version and backend.model_dir == str(tiny_model)
    assert backend.parse(["cheap thai"])[0].raw  # it parses, on the folder it was given
    replica_copy = pickle.loads(pickle.dumps(folder))
    assert (
        replica_copy.version == version
        and replica_copy.schema == folder.schema
        and os.fspath(replica_copy) == str(tiny_model)
    )


def _edit_meta(**changes):
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "querytune.json").read_text())
        for key, value in changes.items():
            if value is None:
                del meta[key]
            else:
                meta[key] = value
        (folder / "querytune.json").write_text(json.dumps(meta))

    return edit


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


# (what is wrong, how to break a copy of the tiny model, the file the error must name, the field it must name)
BROKEN_FOLDERS = [
    ("json-unclosed", lambda d: (d / "querytune.json").write_text("{"), "querytune.json", ""),
    ("json-list", lambda d: (d / "querytune.json").write_text("[]"), "querytune.json", "object"),
    ("json-null", lambda d: (d / "querytune.json").write_text("null"), "querytune.json", "object"),
    ("json-empty", lambda d: (d / "querytune.json").write_text("{}"), "querytune.json", "adapter"),
    ("json-no-base", _edit_meta(base=None), "querytune.json", "base"),
    ("json-wrong-type", _edit_meta(adapter="yes"), "querytune.json", "adapter"),
    ("schema-not-yaml", lambda d: (d / "schema.yaml").write_text("intents: [\n"), "schema.yaml", ""),
    ("schema-wrong-type", lambda d: (d / "schema.yaml").write_text("intents: 3\n"), "schema.yaml", "intents"),
    ("schema-missing", lambda d: (d / "schema.yaml").unlink(), "schema.yaml", ""),
    ("weights-truncated", _truncate, "adapter_model.safetensors", ""),
    ("weights-missing", lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", ""),
    ("adapter-config-unclosed", lambda d: (d / "adapter_config.json").write_text("{"), "adapter_config.json", ""),
    ("tokenizer-missing", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", ""),
]


@pytest.mark.parametrize(
    "break_it, file, field", [case[1:] for case in BROKEN_FOLDERS], ids=[c[0] for c in BROKEN_FOLDERS]
)
def test_a_broken_model_folder_is_one_line_naming_the_file_and_exit_2(tiny_model, tmp_path, break_it, file, field):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    break_it(folder)
    code, output = predict(folder)
    assert code == 2 and "Traceback" not in output, output
    assert output.strip().count("\n") == 0 and output.startswith(f"error: {folder / file}"), output
    assert field in output, output


@pytest.mark.parametrize("break_it, file", [case[1:3] for case in BROKEN_FOLDERS], ids=[c[0] for c in BROKEN_FOLDERS])
def test_load_backend_raises_model_folder_error_for_a_broken_folder(tiny_model, tmp_path, break_it, file):
    """What the server relies on at start-up: one exception type, its message naming the file."""
    from querytune.runtime.backends import load_backend
    from querytune.runtime.model import ModelFolderError

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    break_it(folder)
    with pytest.raises(ModelFolderError) as raised:
        load_backend("transformers", folder, batch_size=4)
    assert str(raised.value).startswith(str(folder / file)) and "\n" not in str(raised.value)


def test_the_old_cache_variable_still_works_with_one_warning_naming_the_new_one(tmp_path, monkeypatch, capsys):
    import querytune.runtime.model as model_module

    model_module._warn_old_cache_variable.cache_clear()
    monkeypatch.delenv("QUERYTUNE_MODEL_CACHE", raising=False)
    monkeypatch.setenv("QUERYTUNE_CACHE", str(tmp_path / "old"))
    assert model_module.cache_dir() == model_module.cache_dir() == tmp_path / "old"
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "QUERYTUNE_MODEL_CACHE" in warning, warning
    monkeypatch.setenv("QUERYTUNE_MODEL_CACHE", str(tmp_path / "new"))  # the new name wins
    assert model_module.cache_dir() == tmp_path / "new"
