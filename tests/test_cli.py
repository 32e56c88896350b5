"""The command line's conventions: --version, choices listed and checked, positional A B, no silent overwrite."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from querytune.cli import app, common


def run(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_version_prints_the_installed_version():
    r = run(["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"querytune {version('querytune')}"


def test_training_commands_start_again_under_jemalloc_where_the_system_has_it(monkeypatch):
    """The console script re-executes `train` and `demo` with jemalloc preloaded (once: the new process sees it in
    LD_PRELOAD), leaves other commands and QUERYTUNE_ALLOCATOR=system alone, and does nothing without the library."""
    import querytune.cli as cli

    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, args, env: calls.append((args[1:], env.get("LD_PRELOAD"))))
    monkeypatch.setattr(cli, "app", lambda args, prog_name: calls.append(("app", args)))
    monkeypatch.setattr(cli.os.path, "exists", lambda p: p == cli.JEMALLOC[0])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("QUERYTUNE_ALLOCATOR", raising=False)
    cli.main(["train", "sft", "--help"])
    assert calls[0] == (["-m", "querytune.cli", "train", "sft", "--help"], cli.JEMALLOC[0])
    calls.clear()
    monkeypatch.setenv("LD_PRELOAD", cli.JEMALLOC[0])  # the process started again
    cli.main(["train", "sft", "--help"])
    cli.main(["predict", "--help"])
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("QUERYTUNE_ALLOCATOR", "system")
    cli.main(["demo"])
    monkeypatch.delenv("QUERYTUNE_ALLOCATOR")
    monkeypatch.setattr(cli.os.path, "exists", lambda p: False)
    cli.main(["train", "sft"])
    assert calls == [
        ("app", ["train", "sft", "--help"]),
        ("app", ["predict", "--help"]),
        ("app", ["demo"]),
        ("app", ["train", "sft"]),
    ]


def test_each_choice_type_is_the_tuple_its_module_checks():
    from querytune.runtime.backends import BACKENDS
    from querytune.runtime.formats import FORMATS
    from querytune.search import INDEX_KINDS
    from querytune.train.dpo import PRESETS as DPO_PRESETS
    from querytune.train.grpo import PRESETS as GRPO_PRESETS
    from querytune.train.rft import PRESETS as RFT_PRESETS
    from querytune.train.sft import PRESETS
    from querytune.train.targets import EXPLORE_WITH, PICKS

    assert set(get_args(common.Backend)) == set(BACKENDS) and set(get_args(common.Format)) == set(FORMATS)
    assert set(get_args(common.IndexKind)) == set(INDEX_KINDS) and set(get_args(common.Pick)) == set(PICKS)
    assert set(get_args(common.ExploreWith)) == set(EXPLORE_WITH)
    assert set(get_args(common.Preset)) == set(PRESETS) == set(GRPO_PRESETS) == set(RFT_PRESETS)
    assert set(get_args(common.DPOPreset)) == set(DPO_PRESETS)
    from querytune import demo

    assert set(get_args(common.DemoPreset)) == set(demo.PRESETS) == set(demo.REPLAY)


@pytest.mark.parametrize(
    "command, option, shown",
    [
        (["label"], "--backend", "transformers|vllm"),
        (["label"], "--engine", "local|ray"),
        (["serve"], "--backend", "transformers|vllm"),
        (["index", "build"], "--kind", "flat|hnsw"),
        (["train", "sft"], "--format", "user-compact|chat-compact|json|compact"),
        (["train", "sft"], "--preset", "quick|full"),
        (["train", "dpo"], "--pick", "traffic|random|novel"),
        (["train", "grpo"], "--explore-with", "beam|branch|sample"),
    ],
)
def test_help_lists_the_choices_and_a_wrong_one_exits_2_naming_them(command, option, shown):
    assert shown in run([*command, "--help"]).output
    r = run([*command, option, "nonsense"])
    assert r.exit_code == 2 and "'nonsense' is not one of" in r.output


def test_eval_diff_takes_a_and_b_as_arguments_and_the_old_options_still_work(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    new = run(["eval", "diff", str(a), str(b), "--log", str(tmp_path / "log.csv")])
    old = run(["eval", "diff", "--a", str(a), "--b", str(b), "--log", str(tmp_path / "log.csv")])
    assert (
        new.exit_code == old.exit_code == 2
        and f"B {b}: folder not found" in new.output
        and f"B {b}: folder not found" in old.output
    )
    assert "deprecated" not in new.output and "--a is deprecated" in old.output and "eval diff A B" in old.output


def test_every_server_setting_can_come_from_the_environment():
    import typer.main

    command = typer.main.get_command(app).commands["serve"]
    settings = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
    assert settings and all(p.envvar and p.envvar.startswith("QUERYTUNE_") for p in settings), [
        p.name for p in settings if not p.envvar
    ]


def test_models_are_given_one_way_dir_or_name_dir_and_the_old_stage_option_still_works(tmp_path):
    from querytune.cli.common import UserError, named_models

    assert named_models(["runs/sft", "g=runs/grpo"]) == [
        ("sft", tmp_path.__class__("runs/sft")),
        ("g", tmp_path.__class__("runs/grpo")),
    ]
    with pytest.raises(UserError, match="two models named 'sft'"):
        named_models(["a/sft", "b/sft"])
    (tmp_path / "retrieval.json").write_text('{"sft": {"ndcg@10": 0.5}}')
    (tmp_path / "test.jsonl").write_text('{"id": "q0", "text": "thai", "intent": "find_business", "slots": {}}\n')
    (tmp_path / "sft").mkdir()
    common_args = [
        "eval",
        "stages",
        "--retrieval",
        str(tmp_path / "retrieval.json"),
        "--data",
        str(tmp_path / "test.jsonl"),
    ]
    new = run([*common_args, "--model", str(tmp_path / "sft")])
    old = run([*common_args, "--stage", f"sft={tmp_path / 'sft'}"])
    assert (
        new.exit_code == old.exit_code == 2
        and "predictions_test.jsonl not found" in new.output
        and "predictions_test.jsonl not found" in old.output
    )
    assert "deprecated" not in new.output and "--stage is deprecated" in old.output


def test_demo_tiny_runs_the_full_demos_steps_smaller_with_options_each_command_has(tmp_path):
    """`demo --preset tiny` is the same fifteen steps and the same report, only smaller; every option a preset adds is
    one its command's --help lists (a misspelt option would fail minutes into the demo)."""
    import re

    from querytune.demo import PRESETS, steps

    plans = {name: steps(tmp_path, "querytune", "python", 8765, 40, name) for name in PRESETS}
    assert [s.name for s in plans["tiny"]] == [s.name for s in plans["full"]]
    tiny = {s.name: s.commands for s in plans["tiny"]}
    assert {"--rows", "--eval-rows"} <= set(tiny["world"][0]) and all(
        "--max-steps" in tiny[s][0] for s in ("sft", "self_train", "rft", "dpo", "grpo")
    )
    assert (
        "--max-steps" not in {s.name: s.commands for s in plans["full"]}["sft"][0]
    )  # the full demo trains SFT's whole preset
    for plan in plans.values():
        for step in plan:
            for command in step.commands:
                words = [w for w in command[1:] if not w.startswith("-")][:2]
                sub = words[:2] if words[0] in ("world", "index", "train", "eval", "cache") else words[:1]
                shown = run([*sub, "--help"]).output
                for option in (w for w in command if re.fullmatch(r"--[a-z-]+", w)):
                    assert option in shown, f"{' '.join(sub)}: no {option}"


# No command writes into a folder that holds results unless told: refused in one line naming the folder and the flag
# that replaces it (nothing in it touched), and with that flag no earlier output stays beside the new ones.


def stale_folder(path) -> dict[str, bytes]:
    """A folder holding a trained model's test results, as `make demo` leaves beside the weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "predictions_test.jsonl").write_text('{"id": "old"}\n')
    (path / "parse_test.json").write_text("{}\n")
    return files(path)


def files(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_refused(args: list[str], out, flag: str = "--force", option: str = "--out") -> None:
    before = files(out)
    r = run(args)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert errors[0].startswith(f"error: {option} {out}: not empty") and flag in errors[0], errors[0]
    assert files(out) == before, "a refused command changes nothing"


def test_world_make_refuses_a_folder_that_is_not_empty_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    args = ["world", "make", "--out", str(tmp_path), "--rows", "1000", "--per-city", "60", "--eval-rows", "50"]
    assert_refused(args, tmp_path)
    r = run([*args, "--force"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "notes.txt").exists() and (tmp_path / "stats.json").is_file()


def test_train_sft_refuses_a_trained_folder_and_force_leaves_no_stale_output(tiny_base, small_world_master, tmp_path):
    out = tmp_path / "sft"
    stale_folder(out)
    (out / "adapter_model.safetensors").write_bytes(b"old weights")
    args = [
        "train",
        "sft",
        "--data",
        str(small_world_master / "seed.jsonl"),
        "--out",
        str(out),
        "--base",
        str(tiny_base),
    ]
    args += ["--max-steps", "1", "--batch-size", "2", "--no-bf16", "--lora-r", "4"]
    assert_refused(args, out)
    r = run([*args, "--force"])
    assert r.exit_code == 0, r.output
    assert not (out / "predictions_test.jsonl").exists() and not (out / "parse_test.json").exists()
    assert (out / "adapter_model.safetensors").read_bytes() != b"old weights" and (out / "summary.json").is_file()


@pytest.mark.parametrize("stage", ["rft", "dpo", "grpo"])
def test_train_stages_refuse_a_trained_folder_and_force_empties_it_first(stage, tiny_model, tmp_path):
    """The refusal comes before any work; with --force the stale results are gone before the run starts (here it
    stops at once on an empty world: what is left is the new run's config alone)."""
    out, empty = tmp_path / stage, tmp_path / "empty"
    stale_folder(out)
    empty.mkdir()
    args = ["train", stage, "--init", str(tiny_model), "--world", str(empty), "--index", str(empty), "--out", str(out)]
    assert_refused(args, out)
    r = run([*args, "--force"])
    assert r.exit_code == 2 and "--force" not in r.output, r.output
    assert set(files(out)) == {"train_config.json"}


def test_train_force_refuses_to_empty_a_folder_holding_an_input(tiny_model, tmp_path):
    import shutil

    out = tmp_path / "models"
    init = Path(shutil.copytree(tiny_model, out / "sft"))
    kept = files(out)
    args = ["train", "dpo", "--init", str(init), "--world", str(tmp_path), "--index", str(tmp_path)]
    r = run([*args, "--out", str(out), "--force"])
    assert r.exit_code == 2 and f"holds {init}; --force would remove it" in r.output and files(out) == kept


def test_export_refuses_a_folder_that_is_not_empty_and_force_replaces_it(tiny_model, tmp_path):
    out = tmp_path / "exported"
    stale_folder(out)
    args = ["export", "--model", str(tiny_model), "--out", str(out)]
    assert_refused(args, out)
    r = run([*args, "--force"])
    assert r.exit_code == 0, r.output
    assert not (out / "predictions_test.jsonl").exists() and (out / "querytune.json").is_file()
    # a merged export records no base for a new LoRA: training from it is one line, not a crash after training
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "thai food", "intent": "find_business", "slots": {"cuisine": "thai"}}) + "\n")
    r = run(["train", "sft", "--init", str(out), "--data", str(data), "--out", str(tmp_path / "again")])
    assert r.exit_code == 2 and "a merged folder (querytune export)" in r.output, r.output
    assert not (tmp_path / "again").exists()


def test_index_build_refuses_a_folder_that_is_not_empty_and_force_replaces_it(
    small_world_master, hash_embedder, tmp_path, monkeypatch
):
    monkeypatch.setattr("querytune.search.Embedder", lambda: hash_embedder)  # no MiniLM download at this edge
    out = tmp_path / "index"
    stale_folder(out)
    args = ["index", "build", "--world", str(small_world_master), "--out", str(out)]
    assert_refused(args, out)
    r = run([*args, "--force"])
    assert r.exit_code == 0, r.output
    assert set(files(out)) == {"index.faiss", "catalog.parquet", "meta.json"}


def test_eval_report_refuses_a_folder_that_is_not_empty_and_force_empties_it(tmp_path):
    ws = tmp_path / "ws"
    for part in ("world", "index", "models"):
        (ws / part).mkdir(parents=True)
    stale_folder(ws / "report")
    assert_refused(["eval", "report", "--workspace", str(ws)], ws / "report")
    r = run(["eval", "report", "--workspace", str(ws), "--force"])
    assert r.exit_code == 2 and "--force" not in r.output  # the empty world then stops the report, with one line
    assert files(ws / "report") == {}


def test_cache_warm_refuses_a_work_folder_that_is_not_empty_and_force_replaces_it(
    tiny_model, small_world_master, tmp_path
):
    import pandas as pd

    pd.read_parquet(small_world_master / "log.parquet", columns=["query"]).head(40).to_parquet(tmp_path / "log.parquet")
    work = tmp_path / "work"
    stale_folder(work)
    args = ["cache", "warm", str(tmp_path / "log.parquet"), "--model", str(tiny_model), "--top", "5"]
    args += ["--cache", f"sqlite:///{tmp_path / 'cache.db'}", "--work", str(work)]
    assert_refused(args, work, option="--work")
    r = run([*args, "--force"])
    assert r.exit_code == 0, r.output
    assert not (work / "predictions_test.jsonl").exists() and (work / "labels" / "summary.json").is_file()


def test_label_resumes_its_own_folder_and_empties_any_other_only_with_restart(tiny_model, small_world_master, tmp_path):
    import pandas as pd

    pd.read_parquet(small_world_master / "log.parquet", columns=["query"]).head(20).to_parquet(tmp_path / "log.parquet")
    out = tmp_path / "labels"
    stale_folder(out)
    args = ["label", str(tmp_path / "log.parquet"), "--model", str(tiny_model), "--out", str(out)]
    assert_refused(args, out, flag="--restart")
    r = run([*args, "--restart"])
    assert r.exit_code == 0, r.output
    assert not (out / "predictions_test.jsonl").exists() and (out / "summary.json").is_file()
    r = run(args)  # a finished labeling folder is resumed: nothing labeled twice, nothing removed
    assert r.exit_code == 0 and '"labeled_now": 0' in r.output, r.output


def test_data_split_refuses_a_folder_that_is_not_empty_and_force_replaces_it(small_world_master, tmp_path):
    out = tmp_path / "split"
    stale_folder(out)
    args = ["data", "split", str(small_world_master / "seed.jsonl"), "--out", str(out)]
    assert_refused(args, out)
    r = run([*args, "--force"])
    assert r.exit_code == 0, r.output
    assert set(files(out)) == {"train.jsonl", "heldout.jsonl"}


def test_force_never_follows_a_link_nor_empties_a_link_the_temp_folder_or_one_holding_an_input(tmp_path, monkeypatch):
    import tempfile

    from querytune.cli.common import UserError, prepare_out

    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("kept")
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "data.jsonl").write_text("{}\n")
    (out / "dir-link").symlink_to(elsewhere, target_is_directory=True)
    (out / "file-link").symlink_to(elsewhere / "keep.txt")
    with pytest.raises(UserError, match="holds .*data.jsonl; --force would remove it"):
        prepare_out(out, True, inputs=[out / "sub" / "data.jsonl"])
    with pytest.raises(UserError, match="a symbolic link"):
        prepare_out(out / "dir-link", True)
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))  # the temp folder itself is never emptied
    with pytest.raises(UserError, match="a system folder"):
        prepare_out(elsewhere, True)
    monkeypatch.chdir(out / "sub")  # nor the folder a command runs in, or one above it
    with pytest.raises(UserError, match="holds .*sub; --force would remove it"):
        prepare_out(out, True)
    monkeypatch.chdir(tmp_path)
    prepare_out(out, True)
    assert list(out.iterdir()) == [] and (elsewhere / "keep.txt").read_text() == "kept"


def test_a_command_whose_extra_is_missing_stops_in_one_line_naming_it(monkeypatch, capsys, tmp_path):
    """The console script turns a missing module of an extra (pyproject's optional-dependencies) into one line and exit
    code 2; a missing module of no extra is a bug and keeps its traceback. The demo checks its extras before its first
    step. (tests/test_wheel.py runs the real commands from a wheel installed without their extras.)"""
    import sys

    import querytune.cli as cli

    monkeypatch.setitem(sys.modules, "trl", None)  # None: `import trl` fails, and find_spec says it is not installed
    r = run(["demo", "--workspace", str(tmp_path / "ws")])
    assert r.exit_code == 2 and "querytune demo needs the 'train' extra: pip install 'querytune[train]'" in r.output
    assert not (tmp_path / "ws").exists()

    monkeypatch.setitem(sys.modules, "orjson", None)
    # `serve` imports querytune.serving.serve again, which imports orjson
    monkeypatch.delitem(sys.modules, "querytune.serving.serve", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--model", str(tmp_path)])
    said = capsys.readouterr().err
    assert stopped.value.code == 2 and said == (
        "error: querytune serve needs the 'serve' extra (no module named 'orjson'): pip install 'querytune[serve]'\n"
    )
    monkeypatch.setitem(sys.modules, "querytune.serving.serve", None)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["serve", "--model", str(tmp_path)])
