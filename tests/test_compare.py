"""eval/compare.py end to end on the small world and the tiny model: every row of the ceiling table, resumable."""

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
           "--dtype", "fp32", "--jobs", "2"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    result = json.loads((out / "compare.json").read_text())
    systems = {"raw", "bm25", "peer", "sft", "control", "label_ceiling", "guideline_run", "guideline_oracle", "oracle"}
    assert systems <= set(result["table"]["all"])
    assert result["meta"]["steps_done"] == {"control": 1, "label_ceiling": 1, "guideline_run": 1}
    assert {"dtype", "threads", "batch_size", "hardware"} <= set(result["meta"])
    overall = result["table"]["all"]
    assert overall["oracle"]["ndcg@10"] > overall["raw"]["ndcg@10"]
    assert set(overall["label_ceiling"]["vs_control"]) == {"mean", "low", "high"} and "vs_control" not in overall["control"]
    assert {"taxonomy", "drift", "generic_name", "filter_guideline"} & set(result["table"])  # per-mechanism rows
    # the ceiling and the guideline rows add the same log texts, labeled with the need and with the guideline
    ceiling = [json.loads(line) for line in (out / "data" / "label_ceiling.jsonl").read_text().splitlines()]
    guideline = [json.loads(line) for line in (out / "data" / "guideline_run.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in ceiling) == sorted(r["text"] for r in guideline)
    assert any(a != b for a, b in zip(sorted(map(json.dumps, ceiling)), sorted(map(json.dumps, guideline))))
    stamp = (out / "models" / "control" / "querytune.json").stat().st_mtime
    rerun = subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    assert "train sft" not in rerun.stdout and (out / "models" / "control" / "querytune.json").stat().st_mtime == stamp
