"""The relevance report: its bootstrap, its slices, and the page itself (numbers = metrics.json, rendered in
headless Chromium, plots visible)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from querytune.evaluation import breakdowns, charts
from querytune.evaluation.parse_eval import parse_metrics, parse_scores
from querytune.evaluation.report import (
    MIN_SLICE,
    Workspace,
    barely_trained,
    build_report,
    metric_interval,
    slice_table,
    summary_markdown,
)
from querytune.metrics import bootstrap

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_interval_has_the_width_of_the_binomial_standard_error():
    ok = np.array([1.0] * 300 + [0.0] * 700)
    acc = lambda c, axis: c["ok"].mean(axis=axis)  # noqa: E731
    value, low, high = bootstrap(acc, {"ok": ok}, n=2000)
    se = (0.3 * 0.7 / len(ok)) ** 0.5
    assert value == pytest.approx(0.3) and low < 0.3 < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap(acc, {"ok": ok}, n=2000) == (value, low, high)  # seeded: the same interval every run
    assert bootstrap(acc, {"ok": np.ones(50)})[1:] == (1.0, 1.0)  # no spread, no width
    wide = bootstrap(acc, {"ok": ok[::10]}, n=2000)  # 10x fewer queries: ~3.2x wider
    assert (wide[2] - wide[1]) / (high - low) == pytest.approx(10**0.5, rel=0.25)


def test_bootstrapped_slot_f1_is_parse_metrics_micro_f1():
    golds = [
        {"intent": "a", "slots": {"x": "1", "y": "2"}},
        {"intent": "b", "slots": {"x": "3"}},
        {"intent": "a", "slots": {}},
    ]
    preds = [{"intent": "a", "slots": {"x": "1"}}, None, {"intent": "a", "slots": {"z": "9"}}]
    scores = pd.DataFrame([parse_scores(g, p) for g, p in zip(golds, preds)])
    want = parse_metrics(golds, preds)
    for metric in ("slot_f1", "intent_accuracy", "frame_exact_match", "validity"):
        assert metric_interval(scores, metric)["value"] == pytest.approx(want[metric], abs=1e-4)


def test_barely_trained_names_each_stage_that_is_and_only_those(tmp_path):
    for name, summary, batch in (
        ("sft", {"stage": "sft", "steps": 600, "examples": 2000}, 8),  # 2.4 passes: trained
        ("tiny_sft", {"stage": "sft", "steps": 24, "examples": 875}, 8),
        ("dpo", {"stage": "dpo", "steps": 28}, 8),  # the full demo's DPO: few steps, but enough
        ("grpo", {"stage": "grpo", "steps": 2}, 16),
        ("no_summary", None, None),
    ):
        (tmp_path / name).mkdir()
        if summary:
            (tmp_path / name / "summary.json").write_text(json.dumps(summary))
            (tmp_path / name / "train_config.json").write_text(json.dumps({"batch_size": batch}))
    why = barely_trained({p.name: p for p in sorted(tmp_path.iterdir())})
    assert why == [
        "grpo: 2 optimizer steps",
        "tiny_sft: 24 steps x 8 = 192 examples, 0.22 of one pass over its 875 labeled rows",
    ]
    assert barely_trained({"sft": tmp_path / "sft", "dpo": tmp_path / "dpo"}) == []


def test_a_slice_with_too_few_queries_says_so_instead_of_a_number():
    rows = [
        {
            "id": f"q{i}",
            "intent": "find_business",
            "user_city": "austin" if i < MIN_SLICE else "boston",
            "traffic": "head",
            "effects": ["typo"] if i % 2 else [],
            "phrasing_in_seed": True,
        }
        for i in range(MIN_SLICE + 5)
    ]
    rng = np.random.default_rng(0)
    scores = pd.DataFrame([{"system": "raw", "id": r["id"], "ndcg@10": rng.random()} for r in rows])
    slices = slice_table(scores, rows, ["raw"])
    assert slices["user_city"]["boston"] == {"n": 5, "too_few": True}
    assert (
        slices["user_city"]["austin"]["n"] == MIN_SLICE and "ndcg@10" in slices["user_city"]["austin"]["systems"]["raw"]
    )
    assert (
        slices["effects"]["typo"]["n"] == (MIN_SLICE + 5) // 2
        and slices["effects"]["none"]["n"] == (MIN_SLICE + 6) // 2
    )
    metrics = {"meta": {"test_rows": len(rows), "graded_rows": len(rows)}, "intervals": {"raw": {}}, "slices": slices}
    assert "| boston | 5 | too few queries (n=5) |" in summary_markdown(metrics)


@pytest.mark.slow
def test_report_page_numbers_match_metrics_json_and_chromium_shows_the_plots(small_world, real_index, tmp_path):
    rows = [json.loads(line) for line in (small_world / "test.jsonl").read_text().splitlines()]
    ws = Workspace.at(tmp_path / "ws", world=small_world, index=real_index)
    for stage, spoil in (
        ("sft", lambda i, g: {"intent": g["intent"], "slots": {}} if i % 4 == 0 else g),
        ("dpo", lambda i, g: None if i % 7 == 0 else g),
    ):
        folder = ws.models / stage
        folder.mkdir(parents=True)
        shutil.copy(ROOT / "data" / "schema.yaml", folder / "schema.yaml")
        with open(folder / "predictions_test.jsonl", "w") as f:
            for i, r in enumerate(rows):
                pred = spoil(i, {"intent": r["intent"], "slots": r["slots"]})
                f.write(
                    json.dumps(
                        {
                            "id": r["id"],
                            "text": r["text"],
                            "pred": pred,
                            "valid": pred is not None,
                            "confidence": 0.5 + (i % 5) / 10,
                        }
                    )
                    + "\n"
                )
        (folder / "steps.jsonl").write_text(
            "".join(
                json.dumps({"step": s, "loss": 2.0 / s, "reward": 0.1 * s, "seconds": 1.0}) + "\n" for s in range(1, 20)
            )
        )
    (ws.models / "sft" / "summary.json").write_text(json.dumps({"stage": "sft", "steps": 24, "examples": 875}))
    (ws.models / "sft" / "train_config.json").write_text(json.dumps({"batch_size": 8}))
    metrics = build_report(ws, say=lambda _: None)
    assert list(metrics["stages"]) == ["raw", "bm25", "peer", "sft", "dpo", "oracle"]
    assert metrics["stages"]["oracle"]["slot_f1"] == 1.0 and metrics["stages"]["sft"]["slot_f1"] < 1.0
    assert metrics["stages"]["dpo"]["validity"] == pytest.approx(1 - len(range(0, len(rows), 7)) / len(rows), abs=1e-4)
    assert metrics["stages"]["sft"]["ndcg@10"] <= metrics["stages"]["oracle"]["ndcg@10"]
    on_disk = json.loads((ws.report / "metrics.json").read_text())
    assert on_disk["stages"] == metrics["stages"] and (ws.report / "summary.md").is_file()

    page = (ws.report / "index.html").read_text()
    # a barely trained run says so on top of both pages, before any figure
    warning = "These models are barely trained (sft: 24 steps x 8 = 192 examples, 0.22 of one pass"
    assert warning in page.split("<table>")[0] and warning in (ws.report / "summary.md").read_text().split("|")[0]
    first_table = page.split("<table>")[1].split("</table>")[0]
    for tr in re.findall(r"<tr>(.*?)</tr>", first_table)[1:]:
        cells = re.findall(r"<td>(.*?)</td>", tr)
        name, shown = cells[0], cells[1:]
        for metric, cell in zip(
            ("ndcg@10", "recall@10", "mrr", "intent_accuracy", "slot_f1", "frame_exact_match", "validity"), shown
        ):
            want = on_disk["intervals"][name].get(metric)
            assert (cell == "") if want is None else cell.startswith(f"{want['value']:.3f}<br>"), (name, metric, cell)
    assert page.count("data:image/png;base64,") >= 8 and "http" not in page.replace("http://", "").split("<body>")[0]
    for alt in ("difference from sft", "F1 per slot", "intent confusion", "calibration", "cache coverage"):
        assert f'<img alt="{alt}"' in page, alt

    # against the baseline: the paired table shows metrics.json's differences, and dpo's lost parses show as a loss
    assert on_disk["baseline"] == "sft" and set(on_disk["paired"]) == {"raw", "bm25", "peer", "dpo", "oracle"}
    paired_table = page.split("<h2>Against sft</h2>")[1].split("</table>")[0]
    for tr in re.findall(r"<tr>(.*?)</tr>", paired_table)[1:]:
        cells = re.findall(r"<td>(.*?)</td>", tr)
        for metric, cell in zip(("ndcg@10", "intent_accuracy", "slot_f1"), cells[1:]):
            want = on_disk["paired"][cells[0]].get(metric)
            assert (cell == "") if want is None else cell.startswith(f"{want['value']:+.3f}<br>"), (
                cells[0],
                metric,
                cell,
            )
    sft_f1, dpo_f1 = metrics["stages"]["sft"]["slot_f1"], metrics["stages"]["dpo"]["slot_f1"]
    assert on_disk["paired"]["dpo"]["slot_f1"]["value"] == pytest.approx(dpo_f1 - sft_f1, abs=2e-4)
    confusion = np.array(on_disk["intent_confusion"]["dpo"]["counts"])
    assert confusion[:, -1].sum() == len(range(0, len(rows), 7)) and confusion.sum() == len(rows)  # the invalid column
    assert on_disk["calibration"]["sft"]["n"] == len(rows) and on_disk["cache_coverage"]["rows"] > 0
    golds = [{"intent": r["intent"], "slots": r["slots"]} for r in rows]
    assert (
        on_disk["slot_f1_by_slot"]["dpo"]
        == parse_metrics(golds, [None if i % 7 == 0 else g for i, g in enumerate(golds)])["per_slot"]
    )

    import sqlite3

    with sqlite3.connect(ws.report / on_disk["browser"].removeprefix("report/")) as db:
        by_system = dict(db.execute("SELECT system, count(*) FROM parses GROUP BY system"))
        invalid = db.execute("SELECT count(*) FROM parses WHERE system = 'dpo' AND intent = 'invalid'").fetchone()[0]
        # Datasette binds a filter's value as text (`?frame_right=0`, `?valid=1`, `?ndcg@10__lt=0.5`): the counts
        # must be those of the numbers
        for where, value, number in [("frame_right = ?", "0", 0), ("valid = ?", "1", 1), ('"ndcg@10" < ?', "0.5", 0.5)]:
            as_text, as_number = (
                db.execute(f"SELECT count(*) FROM parses WHERE {where}", [v]).fetchone()[0] for v in (value, number)
            )
            assert as_text == as_number > 0, where
    assert by_system == {"peer": len(rows), "sft": len(rows), "dpo": len(rows)} and invalid == len(
        range(0, len(rows), 7)
    )

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed for this test (Debian: apt-get install chromium; .ci/run installs it)"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            (ws.report / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    not_white = (img < 235).any(axis=2).mean()
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    assert not_white > 0.08, f"the page looks blank ({not_white:.1%} of pixels drawn)"
    assert colours > 200, f"only {colours} colours: the plots did not render"


def test_demo_steps_skip_work_done_for_the_same_inputs_and_code(tmp_path):
    import sys

    from querytune.demo import Step, run_steps

    ws = tmp_path / "ws"
    count = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
        "p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else '1')"
    )

    def plan(arg: str = "x") -> list[Step]:
        return [
            Step("a", [[sys.executable, "-c", count, str(ws / "a.txt"), arg]], ["a.txt"]),
            Step("b", [[sys.executable, "-c", count, str(ws / "b.txt")]], ["b.txt"], after=["a"]),
        ]

    runs = lambda: (int((ws / "a.txt").read_text()), int((ws / "b.txt").read_text()))  # noqa: E731
    run_steps(ws, plan(), "code1", say=lambda _: None)
    assert runs() == (1, 1)
    assert run_steps(ws, plan(), "code1", say=lambda _: None) == {"a": 0.0, "b": 0.0} and runs() == (
        1,
        1,
    )  # nothing to do
    times = json.loads((ws / "eval" / "demo_times.json").read_text())
    assert (
        times["this_run"] == {"a": 0.0, "b": 0.0}
        and set(times["step_seconds"]) == {"a", "b"}
        and None not in times["step_seconds"].values()
    )  # first run's times kept
    run_steps(ws, plan("y"), "code1", say=lambda _: None)  # a's command changed: a and what reads it run again
    assert runs() == (2, 2)
    run_steps(ws, plan("y"), "code2", say=lambda _: None)  # the code changed: everything runs again
    assert runs() == (3, 3)
    (ws / "b.txt").unlink()  # an output went missing: that step runs again
    run_steps(ws, plan("y"), "code2", say=lambda _: None)
    assert runs() == (3, 1)
    with pytest.raises(SystemExit, match="step bad failed"):
        run_steps(
            ws, [Step("bad", [[sys.executable, "-c", "raise SystemExit(3)"]], ["never"])], "code2", say=lambda _: None
        )


def test_a_demo_step_that_cannot_run_is_skipped_with_its_reason_and_its_stale_output_removed(tmp_path):
    """DPO and GRPO need the miner's edits (`miner_accepted`): without them the step says why, runs nothing, and an
    output of an earlier run does not stand in for it."""
    import sys

    from querytune.demo import Step, miner_accepted, run_steps

    ws = tmp_path / "ws"
    (ws / "models" / "dpo").mkdir(parents=True)
    (ws / "models" / "dpo" / "summary.json").write_text("{}")  # a stale model of an earlier run
    (ws / "models" / "rft").mkdir()
    (ws / "models" / "rft" / "labels.jsonl").write_text(json.dumps({"text": "pizza", "edits": []}) + "\n")
    said: list[str] = []
    step = Step(
        "dpo",
        [[sys.executable, "-c", "raise SystemExit(3)"]],
        ["models/dpo/summary.json"],
        clean=["models/dpo"],
        needs=miner_accepted,
    )
    assert run_steps(ws, [step], "code", say=said.append) == {"dpo": 0.0}
    assert "skipped: the click-evidence miner accepted no edit" in said[0] and not (ws / "models" / "dpo").exists()
    assert json.loads((ws / "eval" / "demo_times.json").read_text())["step_seconds"] == {"dpo": None}
    (ws / "models" / "rft" / "labels.jsonl").write_text(
        json.dumps({"text": "pizza", "edits": [{"kind": "what"}]}) + "\n"
    )
    assert miner_accepted(ws) is None


def test_docs_cli_reference_is_generated_from_the_current_help(tmp_path):
    # the command of `make readme`: typer's own Markdown generator
    out = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, "-m", "typer", "querytune.cli", "utils", "docs", "--name", "querytune"]
        + ["--title", "CLI reference", "--output", str(out)],
        check=True,
        capture_output=True,
    )
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert out.read_text() == text, "docs/cli.md's CLI reference is stale: run `make readme`"
    for command in (
        "querytune eval report",
        "querytune eval diff",
        "querytune demo",
        "querytune label",
        "querytune serve",
    ):
        assert re.search(rf"^#+ `{command}`$", text, flags=re.M), command
    assert "[env var: QUERYTUNE_CACHE_URL]" in text and "[default: transformers]" in text


def test_paired_differences_are_the_difference_of_the_two_systems_and_narrower_than_apart():
    rng = np.random.default_rng(0)
    hard = rng.random(400)  # per-query difficulty both systems share: what a paired interval cancels
    ids = [f"q{i}" for i in range(400)]
    a = (hard > 0.5).astype(float)
    b = np.where(rng.random(400) < 0.1, 1.0, a)  # b fixes a tenth of a's misses
    scores = pd.DataFrame(
        [
            {"system": s, "id": i, "intent_accuracy": v[k], "ndcg@10": v[k], "tp": v[k], "fp": 1 - v[k], "fn": 0.0}
            for s, v in (("a", a), ("b", b))
            for k, i in enumerate(ids)
        ]
    )
    d = breakdowns.paired_differences(scores, "a", ["a", "b"])["b"]
    assert set(d) == {"ndcg@10", "intent_accuracy", "slot_f1"} and d["intent_accuracy"]["n"] == 400
    assert d["intent_accuracy"]["value"] == pytest.approx(b.mean() - a.mean(), abs=1e-4)
    assert 0 < d["intent_accuracy"]["low"] < d["intent_accuracy"]["high"]  # a small gain the pairing can see
    apart = [metric_interval(scores[scores["system"] == s], "intent_accuracy") for s in "ab"]
    assert apart[1]["low"] < apart[0]["high"]  # ... which the two separate intervals, overlapping, could not
    f1 = lambda v: 2 * v.sum() / (2 * v.sum() + (1 - v).sum())  # noqa: E731
    assert d["slot_f1"]["value"] == pytest.approx(f1(b) - f1(a), abs=1e-4)


def test_calibration_bins_and_expected_error():
    records = (
        [{"confidence": 0.95, "right": True}] * 9
        + [{"confidence": 0.95, "right": False}]
        + [{"confidence": 0.15, "right": True}] * 5
        + [{"confidence": 0.15, "right": False}] * 5
        + [{"confidence": None, "right": True}]
    )
    c = breakdowns.calibration(records)
    assert c["n"] == 20 and [(b["n"], b["right"]) for b in c["bins"]] == [(10, 0.5), (10, 0.9)]
    assert c["ece"] == pytest.approx(0.5 * abs(0.15 - 0.5) + 0.5 * abs(0.95 - 0.9), abs=1e-4)
    assert breakdowns.calibration([{"confidence": None, "right": True}]) is None


def test_intent_confusion_counts_invalid_parses_in_their_own_column():
    golds = [{"intent": "a", "slots": {}}, {"intent": "a", "slots": {}}, {"intent": "b", "slots": {}}]
    c = breakdowns.intent_confusion(
        golds, [{"intent": "b", "slots": {}}, None, {"intent": "b", "slots": {}}], ["a", "b"]
    )
    assert c == {"gold": ["a", "b"], "predicted": ["a", "b", "invalid"], "counts": [[0, 1, 1], [0, 1, 0]]}


def test_cache_coverage_counts_normalised_queries_and_the_later_period(tmp_path):
    queries = ["Thai"] * 6 + ["thai "] * 2 + ["sushi"] * 3 + ["pho", "tacos"] + ["thai"] * 3 + ["ramen"] * 3
    periods = ["early"] * 13 + ["late"] * 6
    pd.DataFrame({"query": queries, "period": periods}).to_parquet(tmp_path / "log.parquet")
    c = breakdowns.cache_coverage(tmp_path / "log.parquet", sizes=(1, 2))
    assert c["rows"] == 19 and c["distinct"] == 5
    assert c["curves"]["the whole log"] == [
        {"top_n": 1, "coverage": round(11 / 19, 4)},
        {"top_n": 2, "coverage": round(14 / 19, 4)},
        {"top_n": 5, "coverage": 1.0},
    ]
    # filled from the early top 1 (thai), the late period asks thai 3 times of 6; its ramen was never cached
    assert c["curves"]["filled from early, asked by late"][0] == {"top_n": 1, "coverage": 0.5}
    assert c["curves"]["filled from early, asked by late"][-1] == {"top_n": 4, "coverage": 0.5}
    assert breakdowns.cache_coverage(tmp_path / "missing.parquet") is None


def _overlaps(fig) -> list[str]:
    """Titles of a figure's panels that its own title (suptitle) overlaps once drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    if fig._suptitle is None:
        return []
    top = fig._suptitle.get_window_extent(renderer)
    return [
        ax.title.get_text()
        for ax in fig.axes
        if ax.title.get_text() and ax.title.get_window_extent(renderer).overlaps(top)
    ]


def test_chart_titles_never_overlap_their_panel_titles():
    iv = lambda v: {"value": v, "low": v - 0.05, "high": v + 0.05, "n": 100}  # noqa: E731
    intervals = {
        s: {
            "ndcg@10": iv(0.5),
            "recall@10": iv(0.6),
            "mrr": iv(0.4),
            "intent_accuracy": iv(0.9),
            "slot_f1": iv(0.8),
            "frame_exact_match": iv(0.7),
        }
        for s in ("raw", "bm25", "peer", "sft", "dpo", "grpo", "oracle")
    }
    paired = {
        s: {"ndcg@10": iv(0.01), "intent_accuracy": iv(-0.02), "slot_f1": iv(0.0)} for s in ("raw", "dpo", "grpo")
    }
    confusion = {
        s: {"gold": ["a", "b"], "predicted": ["a", "b", "invalid"], "counts": [[5, 1, 0], [2, 7, 1]]}
        for s in ("sft", "dpo")
    }
    figures = {
        "retrieval": charts.bars(intervals, ("ndcg@10", "recall@10", "mrr"), "retrieval (95% bootstrap intervals)"),
        "parsing": charts.bars(
            intervals, ("intent_accuracy", "slot_f1", "frame_exact_match"), "parsing (95% bootstrap intervals)"
        ),
        "forest": charts.forest(paired, "sft", ("ndcg@10", "intent_accuracy", "slot_f1")),
        "confusion": charts.confusion(confusion),
    }
    for name, fig in figures.items():
        assert fig is not None and fig._suptitle is not None, name
        assert _overlaps(fig) == [], f"{name}: the figure's title covers its panels' titles"
    cache = {
        "rows": 10,
        "distinct": 4,
        "curves": {"the whole log": [{"top_n": 1, "coverage": 0.5}, {"top_n": 4, "coverage": 1.0}]},
    }
    calib = {
        "sft": {"bins": [{"confidence": 0.2, "right": 0.3}, {"confidence": 0.9, "right": 0.85}], "ece": 0.05, "n": 10}
    }
    slots = {"sft": {"cuisine": {"support": 10, "f1": 0.8}}, "peer": {"cuisine": {"support": 10, "f1": 0.5}}}
    for fig in (charts.coverage(cache), charts.calibration(calib), charts.slot_f1(slots)):
        assert fig is not None and fig.axes[0].get_title()
    assert (
        charts.forest({}, "sft", ("ndcg@10",)) is None
        and charts.coverage(None) is None
        and charts.confusion({}) is None
    )


def test_the_old_panel_layout_did_overlap(tmp_path):
    """The check above can fail: a figure title placed the way the report placed it before (suptitle over panels
    with their own titles, no layout engine, a short figure) is caught."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12.6, 1.6))
    for ax, t in zip(axes, ("ndcg@10", "recall@10", "mrr")):
        ax.set_title(t)
    fig.suptitle("retrieval (95% bootstrap intervals)", y=0.93)
    assert _overlaps(fig)
    plt.close(fig)
