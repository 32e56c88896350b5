"""The command line's conventions: --version, choices listed and checked, positional A B, no silent overwrite."""

from __future__ import annotations

from importlib.metadata import version
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


def test_world_make_refuses_a_folder_that_is_not_empty_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run(["world", "make", "--out", str(tmp_path), "--rows", "1000", "--per-city", "60"])
    assert r.exit_code == 2 and "not empty" in r.output and "--force" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"], "nothing is written"


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
