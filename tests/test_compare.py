"""eval/compare.py end to end on the small world and the tiny model: every row of the table, paired with self-training,
resumable."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_compare_writes_every_row_and_resumes(tiny_model, small_world_master, real_index, tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        str(ROOT / "eval" / "compare.py"),
        "--world",
        str(small_world_master),
        "--index",
        str(real_index),
        "--sft",
        str(tiny_model),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--texts",
        "30",
        "--split",
        "dev",
        "--dtype",
        "fp32",
        "--jobs",
        "2",
        "--grpo-steps",
        "1",
    ]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-4000:]
    result = json.loads((out / "compare.json").read_text())
    trained = [
        "control",
        "label_ceiling",
        "guideline_run",
        "self_train",
        "rft",
        "rft_placebo",
        "rft_no_pool",
        "rft_no_abstain",
    ]
    systems = {"raw", "bm25", "peer", "sft", *trained, "guideline_oracle", "oracle"}
    assert systems <= set(result["table"]["all"])
    steps = result["meta"]["steps_done"]
    assert {k: steps[k] for k in trained} == dict.fromkeys(trained, 1) and set(steps) - set(trained) <= {
        "dpo",
        "grpo",
    }  # where rft accepted an edit
    assert {"dtype", "threads", "batch_size", "hardware"} <= set(result["meta"])
    overall = result["table"]["all"]
    assert overall["oracle"]["ndcg@10"] > overall["raw"]["ndcg@10"]
    assert result["meta"]["bootstrap"]["paired_with"] == "self_train" and "vs_base" not in overall["self_train"]
    assert set(overall["rft"]["vs_base"]) == {"mean", "low", "high"} and set(overall["control"]["vs_base"]) == {
        "mean",
        "low",
        "high",
    }
    assert json.loads((out / "table.json").read_text())["table"] == result["table"]
    assert set(result["edit_audit"]) == {"rft", "rft_placebo", "rft_no_pool", "rft_no_abstain"}
    # the reward rows add the same log texts as the ceiling rows, parsed once by the SFT model and reused
    texts = [
        json.loads(line)["text"] for line in (out / "models" / "self_train" / "greedy.jsonl").read_text().splitlines()
    ]
    assert texts == [
        json.loads(line)["text"] for line in (out / "models" / "rft" / "greedy.jsonl").read_text().splitlines()
    ]
    assert {"taxonomy", "drift", "generic_name", "filter_guideline"} & set(result["table"])  # per-mechanism rows
    # the ceiling and the guideline rows add the same log texts, labeled with the need and with the guideline
    ceiling = [json.loads(line) for line in (out / "data" / "label_ceiling.jsonl").read_text().splitlines()]
    guideline = [json.loads(line) for line in (out / "data" / "guideline_run.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in ceiling) == sorted(r["text"] for r in guideline)
    assert set(texts) <= {r["text"] for r in ceiling}
    assert any(a != b for a, b in zip(sorted(map(json.dumps, ceiling)), sorted(map(json.dumps, guideline))))
    stamp = (out / "models" / "control" / "querytune.json").stat().st_mtime
    rerun = subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    assert (
        "train sft" not in rerun.stdout
        and "train rft" not in rerun.stdout
        and (out / "models" / "control" / "querytune.json").stat().st_mtime == stamp
    )
    # another run beside it takes the models trained with the same settings (as `make compare` takes the demo's)
    linked = subprocess.run(
        [
            *cmd[: cmd.index("--out") + 1],
            str(tmp_path / "cmp2"),
            *cmd[cmd.index("--out") + 2 :],
            "--rows",
            "self_train,rft",
            "--models-from",
            str(out / "models"),
            "--extra",
            f"by_hand={out / 'predictions' / 'rft_dev.jsonl'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert linked.returncode == 0, linked.stderr[-4000:]
    assert (
        "train rft" not in linked.stdout
        and (tmp_path / "cmp2" / "models" / "rft").resolve() == (out / "models" / "rft").resolve()
    )
    linked_table = json.loads((tmp_path / "cmp2" / "compare.json").read_text())["table"]["all"]
    assert {"self_train", "rft", "by_hand"} <= set(linked_table) and linked_table["by_hand"]["ndcg@10"] == linked_table[
        "rft"
    ]["ndcg@10"]


def test_a_model_trained_with_other_settings_is_not_taken():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "eval" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    args = argparse.Namespace(sft=Path("sft"), steps=280, batch_size=8, dtype="bf16", texts=4000, grpo_steps=60)
    rft = {
        "init": "sft",
        "max_steps": 280,
        "batch_size": 8,
        "dtype": "bf16",
        "texts": 4000,
        "edits": "mined",
        "shuffle_clicks": False,
        "pool": True,
        "abstain": True,
        "text_contexts": 0,
        "max_minutes": None,
    }
    assert compare.settings_differ(args, "rft", rft) is None
    assert (
        compare.settings_differ(args, "self_train", rft | {"edits": "none", "text_contexts": 3}) is None
    )  # ST mines nothing
    assert "text_contexts 3 (this run: 0)" in compare.settings_differ(args, "rft", rft | {"text_contexts": 3})
    assert "shuffle_clicks False (this run: True)" in compare.settings_differ(args, "rft_placebo", rft)
    assert "max_steps 140" in compare.settings_differ(args, "rft", rft | {"max_steps": 140})
    grpo = {"init": "sft", "max_steps": 60, "lr": 5e-4, "max_minutes": 0.0}
    assert compare.settings_differ(args, "grpo", grpo) is None
    assert "max_minutes 5.0" in compare.settings_differ(args, "grpo", grpo | {"max_minutes": 5.0})
    assert "preset 'quick' (this run: 'mined')" in compare.settings_differ(
        args, "dpo", {"init": "sft", "preset": "quick", "max_minutes": None}
    )
