"""What the README and docs state equals what the code and the recorded runs say: a default, a preset's budget, the
environment's size, the demo's times and table. A figure that drifts from its source fails here, not in a user's
hands. The recorded runs are eval/demo_tiny.json and eval/demo_full.json (`python eval/record_demo.py`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from querytune.demo import PRESETS, REPLAY
from querytune.runtime.formats import DEFAULT_FORMAT, FORMATS
from querytune.train.dpo import PRESETS as DPO_PRESETS
from querytune.train.rft import RFTRecipe
from querytune.train.sft import PRESETS as SFT_PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FLAT = " ".join(README.split())  # line breaks moved by a reflow do not matter
DOCS = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
FORMAT = r"(?<![\w-])`?(" + "|".join(sorted(FORMATS, key=len, reverse=True)) + r")`?"


def clock(seconds: float) -> str:
    """How the README writes a duration: `13 min 53 s`."""
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def test_every_format_the_docs_call_the_default_is_the_default():
    said = [
        (name, m.group(1))
        for name, text in DOCS.items()
        for pattern in (FORMAT + r" \(the default", r"the default(?: format)?,? " + FORMAT, FORMAT + r",? the default")
        for m in re.finditer(pattern, text)
    ]
    assert len(said) >= 3, said  # the README, docs/loop.md and the --format help each name it
    assert {fmt for _, fmt in said} == {DEFAULT_FORMAT}, said


def test_int8_has_one_speed_up_everywhere_it_is_stated():
    sources = {**DOCS, **{str(p): p.read_text() for p in (ROOT / "querytune").rglob("*.py")}}
    said = {(name, m.group(1)) for name, text in sources.items() for m in re.finditer(r"(\d\.\d+)x the fp32", text)}
    assert len({v for _, v in said}) == 1 and len(said) >= 2, said
    # docs/deployment.md's two rates give that ratio
    fp32, int8 = map(float, re.search(r"([\d.]+) in fp32, ([\d.]+) with `--int8`", DOCS["deployment.md"]).groups())
    assert abs(int8 / fp32 - float(next(iter(said))[1])) <= 0.01, (int8, fp32, said)  # the rates are rounded


def test_the_demo_sizes_the_readme_gives_are_the_presets():
    tiny = dict(zip(PRESETS["tiny"]["world"][::2], PRESETS["tiny"]["world"][1::2]))
    assert f"({int(tiny['--rows']):,} log rows, {tiny['--eval-rows']} test queries)" in FLAT
    assert f"{SFT_PRESETS['quick'].max_steps} steps" in FLAT
    assert f"{RFTRecipe().texts:,} log texts" in FLAT and f"{RFTRecipe().max_steps} steps" in FLAT
    assert f"{REPLAY['full']} later-log requests" in FLAT
    warm = PRESETS["full"]["warm"]
    assert f"labeling the {int(warm[warm.index('--top') + 1]):,} most typed queries" in FLAT
    grpo = PRESETS["full"]["grpo"]
    assert f"GRPO {grpo[grpo.index('--max-steps') + 1]} steps" in FLAT
    passes = {2.0: "two", 4.0: "four", 6.0: "six"}[DPO_PRESETS[PRESETS["full"]["dpo"][1]].epochs]
    assert f"DPO {passes} passes over the miner's pairs" in FLAT


@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_the_readmes_demo_times_are_the_recorded_run(preset):
    record = json.loads((ROOT / "eval" / f"demo_{preset}.json").read_text())
    assert record["commit"] and record["cpu"] and record["date"]
    # the whole command as timed, with its machine and date beside it
    at = FLAT.find(record["wall"])
    assert at >= 0, f"the README does not give the recorded {preset} demo's time, {record['wall']}"
    near = FLAT[max(0, at - 300) : at + 300]
    assert record["cpu"].split(",")[0] in near and record["date"] in near, near
    if preset == "full":  # and each step's time in the table
        row = next(line for line in README.splitlines() if line.startswith("| time |"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        steps = record["step_seconds"]
        predicts = [s for k, s in steps.items() if k.startswith("predict_")]
        want = [steps[k] for k in ("world", "index", "sft", "self_train", "rft", "dpo", "grpo")]
        for cell, seconds in zip(cells, want):
            assert cell.startswith(clock(seconds) if seconds >= 60 else f"{round(seconds)} s"), (cell, seconds)
        assert cells[7].startswith(f"{clock(min(predicts))} to {clock(max(predicts))}"), cells[7]


def test_the_readmes_results_table_is_the_recorded_runs_report():
    record = json.loads((ROOT / "eval" / "demo_full.json").read_text())
    table = README.split("The report's table")[1].split("\n\n")[1]
    shown = {}
    for line in table.splitlines()[2:]:
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        shown[name] = cells
    metrics = ("ndcg@10", "recall@10", "mrr", "intent_accuracy", "slot_f1", "frame_exact_match", "validity")
    assert list(shown) == list(record["table"])
    for name, cells in shown.items():
        for metric, cell in zip(metrics, cells):
            iv = record["table"][name].get(metric)
            if iv is None:
                assert cell == "", (name, metric)
            elif iv[1] == iv[2]:
                assert cell == f"{iv[0]:.3f}", (name, metric, cell)
            else:
                assert cell == f"{iv[0]:.3f} [{iv[1]:.3f}, {iv[2]:.3f}]", (name, metric, cell)
    assert f"{record['test_rows']:,} test queries, {record['graded_rows']:,} with graded relevance" in FLAT


def test_the_environments_size_is_the_readmes():
    said = float(re.search(r"`\.venv` ([\d.]+) GB", README).group(1))
    venv = Path(sys.prefix)
    if venv != ROOT / ".venv":
        pytest.skip(f"runs in the checkout's .venv (make test), not {venv}")
    size = int(subprocess.run(["du", "-sb", str(venv)], capture_output=True, text=True).stdout.split()[0]) / 1e9
    assert abs(size - said) <= 0.15 * said, f".venv is {size:.1f} GB, the README says {said} GB"
