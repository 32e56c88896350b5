"""The whole loop on the embedded default data, in one workspace: `querytune demo` (what `make demo` runs).

    world -> index -> SFT -> self-training (ST) -> RFT -> DPO -> GRPO -> test predictions -> label the log's head into
    the cache -> serve and replay later traffic -> report

ST, RFT, DPO and GRPO all start from the SFT model and add the same 4,000 early-log texts: ST with the model's own
parses (the control), RFT with the edits the click-evidence miner accepts, DPO and GRPO learning from those edits
(`--edits-from`). Where the miner accepts no edit, DPO and GRPO have nothing to learn: their steps say so and are
skipped, and the report has no row for them.

Each step is a `querytune` command run as its own process (its own progress bars). A step whose outputs exist and
whose stamp (`WORKSPACE/.stamps/<step>.json`) holds the same key is skipped; the key hashes the step's command, the
keys of the steps it reads from, and the code (every file of the `querytune` package and the default schema), so
a second run with nothing changed only prints the table again, and a code change redoes what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PACKAGE = Path(__file__).resolve().parent
STAGES = ("sft", "self_train", "rft", "dpo", "grpo")
LEARNERS = ("dpo", "grpo")  # train on the miner's edits in models/rft
# Each step's sizes. full: the quick training presets (SFT 720 steps; ST and RFT 4,000 log texts and 280 steps; DPO
# six passes over the miner's pairs (its mined preset); GRPO 60 steps of 4 texts, about one pass over seed 0's edited
# texts and as many anchors, at lr 5e-4 as eval/compare.py's grpo row); measured stage times: README. tiny: the same
# steps and report on a small world (6,000 log rows, 150 test queries) with a few optimizer steps per stage, to see the
# loop in minutes; its models are barely trained and its figures say nothing about the method.
PRESETS: dict[str, dict[str, list[str]]] = {
    "full": {
        "world": [],
        "sft": [],
        "self_train": [],
        "rft": [],
        "dpo": ["--preset", "mined"],
        "grpo": ["--max-steps", "60", "--lr", "5e-4", "--max-minutes", "0"],
        "warm": ["--top", "1000"],
    },
    "tiny": {
        "world": ["--rows", "6000", "--per-city", "60", "--eval-rows", "150"],
        "sft": ["--max-steps", "24"],
        "self_train": ["--texts", "200", "--max-steps", "4"],
        "rft": ["--texts", "200", "--max-steps", "4"],
        "dpo": ["--max-steps", "4"],
        "grpo": ["--max-steps", "2", "--num-generations", "4", "--batch-size", "16", "--max-minutes", "0"],
        "warm": ["--top", "100"],
    },
}
REPLAY = {"full": 300, "tiny": 40}  # later log requests the serving check replays


def code_key() -> str:
    """A hash of the package's code and the default schema: what a step's output also depends on."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(
        (PACKAGE / "data").rglob("*.yaml")
    ):  # the default schema is package data
        if path.is_file():
            h.update(str(path.relative_to(PACKAGE.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Step:
    name: str
    commands: list[list[str]]
    outputs: list[str]  # relative to the workspace: all must exist for the step to count as done
    after: list[str] = field(default_factory=list)
    capture: str | None = None  # write the last stdout line (a JSON summary) of the first command here
    run: Callable[[Path], None] | None = None  # a Python body instead of commands (the serving check)
    clean: list[str] = field(default_factory=list)  # removed before the step runs again (stale or partial outputs)
    key_extra: str = ""  # what else the output depends on (a `run` body's settings)
    needs: Callable[[Path], str | None] | None = (
        None  # why the step cannot run in this workspace (None: it can); then it is skipped
    )


def steps(ws: Path, cli: str, py: str, serve_port: int, replay: int, preset: str = "full") -> list[Step]:
    w, size = str(ws), PRESETS[preset]
    out = [
        Step(
            "world",
            [[cli, "world", "make", "--out", f"{w}/world", *size["world"]]],
            ["world/test.jsonl", "world/log.parquet"],
            clean=["world"],
        ),
        Step(
            "index",
            [[cli, "index", "build", "--world", f"{w}/world", "--out", f"{w}/index"]],
            ["index/index.faiss"],
            ["world"],
            clean=["index"],
        ),
        Step(
            "sft",
            [
                [
                    cli,
                    "train",
                    "sft",
                    "--data",
                    f"{w}/world/seed.jsonl",
                    "--out",
                    f"{w}/models/sft",
                    "--preset",
                    "quick",
                    *size["sft"],
                ]
            ],
            ["models/sft/summary.json"],
            ["world"],
            clean=["models/sft"],
        ),
    ]
    common = ["--init", f"{w}/models/sft", "--world", f"{w}/world", "--index", f"{w}/index"]
    out.append(
        Step(
            "self_train",
            [[cli, "train", "rft", *common, "--out", f"{w}/models/self_train", "--edits", "none", *size["self_train"]]],
            ["models/self_train/summary.json"],
            ["sft", "index"],
            clean=["models/self_train"],
        )
    )
    out.append(
        Step(
            "rft",
            [
                [
                    cli,
                    "train",
                    "rft",
                    *common,
                    "--out",
                    f"{w}/models/rft",
                    "--greedy-from",
                    f"{w}/models/self_train/greedy.jsonl",
                    *size["rft"],
                ]
            ],
            ["models/rft/summary.json"],
            ["self_train"],
            clean=["models/rft"],
        )
    )
    for stage in LEARNERS:
        out.append(
            Step(
                stage,
                [
                    [
                        cli,
                        "train",
                        stage,
                        *common,
                        "--out",
                        f"{w}/models/{stage}",
                        "--edits-from",
                        f"{w}/models/rft",
                        *size[stage],
                    ]
                ],
                [f"models/{stage}/summary.json"],
                ["rft"],
                clean=[f"models/{stage}"],
                needs=miner_accepted,
            )
        )
    for stage in STAGES:
        out.append(
            Step(
                f"predict_{stage}",
                [
                    [
                        cli,
                        "eval",
                        "parse",
                        "--model",
                        f"{w}/models/{stage}",
                        "--data",
                        f"{w}/world/test.jsonl",
                        "--out",
                        f"{w}/models/{stage}/parse_test.json",
                        "--predictions",
                        f"{w}/models/{stage}/predictions_test.jsonl",
                        "--batch-size",
                        "48",
                    ]
                ],
                [f"models/{stage}/predictions_test.jsonl"],
                [stage],
                clean=[f"models/{stage}/predictions_test.jsonl", f"models/{stage}/parse_test.json"],
                needs=model_made(stage) if stage in LEARNERS else None,
            )
        )
    # the served model labels the head of the early log into the cache, then is promoted
    out.append(
        Step(
            "labels",
            [
                [
                    cli,
                    "cache",
                    "warm",
                    f"{w}/world/log.parquet",
                    "--where",
                    "period=early",
                    *size["warm"],
                    "--model",
                    f"{w}/models/sft",
                    "--cache",
                    f"sqlite:///{w}/cache.db",
                    "--work",
                    f"{w}/labels/head",
                ],
                [cli, "cache", "promote", "--model", f"{w}/models/sft", "--cache", f"sqlite:///{w}/cache.db"],
            ],
            ["labels/head/labels/summary.json", "eval/warm.json", "cache.db"],
            ["sft"],
            capture="eval/warm.json",
            clean=["labels/head", "cache.db", "cache.db-wal", "cache.db-shm", "eval/warm.json"],
        )
    )
    out.append(
        Step(
            "serving",
            [],
            ["eval/serving.json"],
            ["labels"],
            run=lambda ws_: serving_check(ws_, cli, py, serve_port, replay),
            key_extra=f"replay {replay}",
            clean=["eval/serving.json", "eval/fallback.jsonl"],
        )
    )
    out.append(
        Step(
            "report",
            [[cli, "eval", "report", "--workspace", w]],
            ["report/index.html", "report/metrics.json"],
            ["index", *(f"predict_{s}" for s in STAGES), "serving"],
            clean=["report"],
        )
    )
    return out


def miner_accepted(ws: Path) -> str | None:
    """None where the click-evidence miner relabeled a text in models/rft, else why DPO and GRPO cannot run."""
    labels = ws / "models" / "rft" / "labels.jsonl"
    if labels.is_file() and any(json.loads(line)["edits"] for line in labels.open(encoding="utf-8")):
        return None
    return "the click-evidence miner accepted no edit (models/rft/edits.csv): nothing to learn from"


def model_made(stage: str) -> Callable[[Path], str | None]:
    return lambda ws: (
        None if (ws / "models" / stage / "summary.json").is_file() else f"no {stage} model (its step was skipped)"
    )


def serving_check(ws: Path, cli: str, py: str, port: int, replay: int) -> None:
    """Serve the promoted model over the warmed cache and replay later log traffic;
    the load test's JSON -> eval/serving.json."""
    server = subprocess.Popen(
        [
            cli,
            "serve",
            "--model",
            "active",
            "--cache",
            f"sqlite:///{ws}/cache.db",
            "--port",
            str(port),
            "--deadline",
            "60",
            "--fallback-log",
            str(ws / "eval" / "fallback.jsonl"),
            "--workers",
            "1",
        ],  # one model: misses batch together
        start_new_session=True,
    )
    try:
        load = subprocess.run(
            [
                py,
                "-m",
                "querytune.evaluation.loadtest",
                "--url",
                f"http://127.0.0.1:{port}",
                "--wait",
                "300",
                "--log",
                str(ws / "world" / "log.parquet"),
                "--where",
                "period=late",
                "--requests",
                str(replay),
                "--concurrency",
                "16",
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    lines = load.stdout.strip().splitlines()
    print("\n".join(lines[:-1]))
    (ws / "eval" / "serving.json").write_text(lines[-1] + "\n")


def run_demo(
    ws: Path, serve_port: int = 8765, replay: int | None = None, say=print, preset: str = "full"
) -> dict[str, float]:
    """Run every step of the demo (`PRESETS[preset]`'s sizes) not already done for the same inputs and code; returns
    each step's seconds."""
    ws = ws.resolve()
    bindir = Path(sys.executable).parent
    plan = steps(ws, str(bindir / "querytune"), sys.executable, serve_port, replay or REPLAY[preset], preset)
    return run_steps(ws, plan, code_key(), say)


def run_steps(ws: Path, plan: list[Step], code: str, say=print) -> dict[str, float]:
    """Run the steps in order, skipping each whose stamp key and outputs are in place; returns each step's seconds
    (0: skipped). eval/demo_times.json holds those and what each step took when it last ran."""
    (ws / ".stamps").mkdir(parents=True, exist_ok=True)
    (ws / "eval").mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for i, step in enumerate(plan, 1):
        spec = json.dumps(
            [step.name, [c[1:] for c in step.commands], [keys[a] for a in step.after], code, step.key_extra]
        )
        keys[step.name] = key = hashlib.sha256(spec.encode()).hexdigest()[:16]
        stamp = ws / ".stamps" / f"{step.name}.json"
        if step.needs and (why := step.needs(ws)):
            stamp.unlink(missing_ok=True)
            for rel in step.clean:  # no stale output of an earlier run stands in for this one
                path = ws / rel
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            say(f"[{i}/{len(plan)}] {step.name}: skipped: {why}")
            seconds[step.name] = 0.0
            continue
        done = (
            stamp.is_file()
            and json.loads(stamp.read_text()).get("key") == key
            and all((ws / o).exists() for o in step.outputs)
        )
        if done:
            say(f"[{i}/{len(plan)}] {step.name}: up to date (same inputs and code), skipped")
            seconds[step.name] = 0.0
            continue
        say(f"[{i}/{len(plan)}] {step.name} ({_clock(time.perf_counter() - t_all)} elapsed)")
        t0, cpu0 = time.perf_counter(), _child_cpu()
        stamp.unlink(missing_ok=True)
        for rel in step.clean:
            path = ws / rel
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if step.run:
            step.run(ws)
        for n, command in enumerate(step.commands):
            if step.capture and n == 0:
                result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
                print(result.stdout, end="")
                if result.returncode == 0:
                    (ws / step.capture).write_text(result.stdout.strip().splitlines()[-1] + "\n")
            else:
                result = subprocess.run(command)
            if result.returncode != 0:
                raise SystemExit(f"step {step.name} failed (exit {result.returncode}): {' '.join(command)}")
        missing = [o for o in step.outputs if not (ws / o).exists()]
        if missing:
            raise SystemExit(f"step {step.name} finished without writing {', '.join(missing)}")
        seconds[step.name] = round(time.perf_counter() - t0, 1)
        cpu = round(_child_cpu() - cpu0, 1)  # CPU seconds of the step's processes: what it costs, busy machine or not
        stamp.write_text(
            json.dumps(
                {
                    "key": key,
                    "seconds": seconds[step.name],
                    "cpu_seconds": cpu,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            + "\n"
        )
        say(f"    {step.name} took {_clock(seconds[step.name])} ({cpu:.0f} CPU s)")
    # what each step took when it last ran (its stamp), and this run's seconds (0: skipped)
    made = {
        name: json.loads(p.read_text()).get("seconds") if (p := ws / ".stamps" / f"{name}.json").is_file() else None
        for name in keys
    }
    (ws / "eval" / "demo_times.json").write_text(
        json.dumps(
            {"step_seconds": made, "this_run": seconds, "this_run_total": round(time.perf_counter() - t_all, 1)},
            indent=2,
        )
        + "\n"
    )
    return seconds


def _child_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _clock(s: float) -> str:
    return f"{int(s // 60)} min {int(s % 60):02d} s"
