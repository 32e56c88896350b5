"""eval/compare.py end to end on the small world and the tiny model: every row of the table, paired with self-training, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_compare_writes_every_row_and_resumes(tiny_model, small_world_master, real_index, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "eval" / "compare.py"), "--world", str(small_world_master), "--index", str(real_index),
           "--sft", str(tiny_model), "--out", str(out), "--steps", "1", "--batch-size", "2", "--texts", "30", "--split", "dev",
           "--dtype", "fp32", "--jobs", "2", "--grpo-steps", "1"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-4000:]
    result = json.loads((out / "compare.json").read_text())
    trained = ["control", "label_ceiling", "guideline_run", "self_train", "rft", "rft_placebo", "rft_no_pool", "rft_no_abstain"]
    systems = {"raw", "bm25", "peer", "sft", *trained, "guideline_oracle", "oracle"}
    assert systems <= set(result["table"]["all"])
    steps = result["meta"]["steps_done"]
    assert {k: steps[k] for k in trained} == dict.fromkeys(trained, 1) and set(steps) - set(trained) <= {"dpo", "grpo"}  # where rft accepted an edit
    assert {"dtype", "threads", "batch_size", "hardware"} <= set(result["meta"])
    overall = result["table"]["all"]
    assert overall["oracle"]["ndcg@10"] > overall["raw"]["ndcg@10"]
    assert result["meta"]["bootstrap"]["paired_with"] == "self_train" and "vs_base" not in overall["self_train"]
    assert set(overall["rft"]["vs_base"]) == {"mean", "low", "high"} and set(overall["control"]["vs_base"]) == {"mean", "low", "high"}
    assert json.loads((out / "table.json").read_text())["table"] == result["table"]
    assert set(result["edit_audit"]) == {"rft", "rft_placebo", "rft_no_pool", "rft_no_abstain"}
    # the reward rows add the same log texts as the ceiling rows, parsed once by the SFT model and reused
    texts = [json.loads(line)["text"] for line in (out / "models" / "self_train" / "greedy.jsonl").read_text().splitlines()]
    assert texts == [json.loads(line)["text"] for line in (out / "models" / "rft" / "greedy.jsonl").read_text().splitlines()]
    assert {"taxonomy", "drift", "generic_name", "filter_guideline"} & set(result["table"])  # per-mechanism rows
    # the ceiling and the guideline rows add the same log texts, labeled with the need and with the guideline
    ceiling = [json.loads(line) for line in (out / "data" / "label_ceiling.jsonl").read_text().splitlines()]
    guideline = [json.loads(line) for line in (out / "data" / "guideline_run.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in ceiling) == sorted(r["text"] for r in guideline)
    assert set(texts) <= {r["text"] for r in ceiling}
    assert any(a != b for a, b in zip(sorted(map(json.dumps, ceiling)), sorted(map(json.dumps, guideline))))
    stamp = (out / "models" / "control" / "querytune.json").stat().st_mtime
    rerun = subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    assert "train sft" not in rerun.stdout and "train rft" not in rerun.stdout and (out / "models" / "control" / "querytune.json").stat().st_mtime == stamp
