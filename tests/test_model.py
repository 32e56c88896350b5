"""Model folders travel: the base is recorded by name and content hash, model_version never depends on a path,
and `querytune export` makes a folder that needs neither base nor cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from querytune.cli import app
from querytune.runtime.formats import IDENTITY
from querytune.runtime.model import load_model_meta, model_version

QUERIES = ["cheap thai near me", "24h plumber austin", "dentist"]


def predict(model: Path) -> tuple[int, list[dict] | str]:
    result = CliRunner().invoke(app, ["predict", "--model", str(model), *QUERIES])
    return (result.exit_code, [json.loads(line) for line in result.stdout.splitlines()] if result.exit_code == 0 else result.output)


def test_a_copied_model_predicts_the_same_under_a_fresh_cache(tiny_base, small_world_master, tmp_path, monkeypatch):
    base = tmp_path / "tiny-base"
    shutil.copytree(tiny_base, base)
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("QUERYTUNE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "train" / "sft"
    result = CliRunner().invoke(app, ["train", "sft", "--data", str(small_world_master / "seed.jsonl"), "--out", str(model), "--base", str(base),
                                      "--max-steps", "2", "--batch-size", "4", "--no-bf16", "--lora-r", "4"])
    assert result.exit_code == 0, result.output
    meta, _ = load_model_meta(model)
    assert meta["base"] == "tiny-base" and len(meta["base_sha256"]) == 64  # a name and a content hash, not a path to load
    code, before = predict(model)
    assert code == 0, before
    assert {p["model_version"] for p in before} == {model_version(model)}

    # another machine: the folder elsewhere, the training cache gone, a fresh cache, the base no longer where it was
    moved = tmp_path / "elsewhere" / "sft"
    shutil.copytree(model, moved)
    shutil.rmtree(model)
    (tmp_path / "cache").rename(tmp_path / "cache-away")
    fresh = tmp_path / "fresh-cache"
    monkeypatch.setenv("QUERYTUNE_CACHE", str(fresh))
    base.rename(tmp_path / "base-away")
    code, output = predict(moved)
    assert code == 2 and len(output.strip().splitlines()) == 1, output  # one line naming where to put the base
    assert str(fresh / "bases" / "tiny-base") in output and "QUERYTUNE_CACHE" in output

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
    assert model_version(old) == model_version(tiny_model)  # the same base content and adapter: the same version


def test_export_writes_a_merged_folder_that_loads_with_no_cache(tiny_model, tmp_path, monkeypatch):
    work = tmp_path / "model"
    shutil.copytree(tiny_model, work)
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", "--model", str(work), "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta, _ = load_model_meta(out)
    assert meta["adapter"] is False and "base" not in meta and meta["exported_from"]["model_version"] == model_version(work)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    _, before = predict(work)
    shutil.rmtree(work)  # the adapters are gone and the cache is an empty path: the export alone must do
    monkeypatch.setenv("QUERYTUNE_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setattr("querytune.runtime.model.resolve_base", lambda *a: (_ for _ in ()).throw(AssertionError("an export needs no base")))
    code, after = predict(out)
    assert code == 0, after
    assert [(p["parse"], p["valid"]) for p in after] == [(p["parse"], p["valid"]) for p in before]
    assert not (tmp_path / "no-cache").exists()


def test_model_version_follows_the_schema_and_the_format(tiny_model, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    version = model_version(tiny_model)
    assert model_version(copy) == version
    meta = json.loads((copy / "querytune.json").read_text())
    monkeypatch.setitem(IDENTITY, meta["format"], "querytune-format-next")  # what the model reads or writes changed
    assert model_version(copy) != version
    monkeypatch.undo()
    (copy / "querytune.json").write_text(json.dumps(meta | {"format": "json"}))  # the same weights read as the other format
    assert model_version(copy) != version
    (copy / "querytune.json").write_text(json.dumps(meta))
    schema = (copy / "schema.yaml").read_text()
    (copy / "schema.yaml").write_text(schema.replace("description: ", "description: a ", 1))
    assert load_model_meta(copy)[1].version != load_model_meta(tiny_model)[1].version and model_version(copy) != version
