"""The wheel alone carries the package and its data (`make test-wheel`): built from a copy of the sources, installed
into a fresh venv that borrows only the heavy dependencies of this one, and run from outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_wheel_alone_shows_the_schema_and_predicts(tiny_model, tmp_path):
    from querytune.runtime.model import ModelFolder

    src = tmp_path / "src"  # a copy: the build leaves nothing in the shared checkout, and sees only what ships
    shutil.copytree(ROOT / "querytune", src / "querytune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    quiet = os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        tmp_path / "dist",
        src,
        cwd=tmp_path,
        env=quiet,
    )
    wheel = next((tmp_path / "dist").glob("querytune-*.whl"))
    import zipfile

    shipped = zipfile.ZipFile(wheel).namelist()
    assert "querytune/py.typed" in shipped and any(
        n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in shipped
    ), [n for n in shipped if "dist-info" in n]

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
        cwd=tmp_path,
        env=quiet,
    )
    # only now the heavy dependencies of this venv join as a plain path (its .pth files, querytune's editable finder
    # among them, are not run from there); pip above saw an empty venv
    purelib = Path(
        run(
            venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    (purelib / "borrowed.pth").write_text(
        "\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])) + "\n"
    )

    away = tmp_path / "elsewhere"  # outside the checkout, no PYTHONPATH, an empty cache
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {
        "QUERYTUNE_MODEL_CACHE": str(tmp_path / "cache")
    }
    where = run(
        venv / "bin" / "python",
        "-c",
        "import querytune.schema as s; print(s.__file__); print(s.DEFAULT_SCHEMA)",
        cwd=away,
        env=env,
    )
    assert all(line.startswith(str(purelib)) for line in where.stdout.split()), where.stdout

    shown = run(venv / "bin" / "querytune", "schema", "show", cwd=away, env=env)
    assert "intents" in shown.stdout
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    predicted = run(venv / "bin" / "querytune", "predict", "--model", model, "cheap thai near me", cwd=away, env=env)
    line = json.loads(predicted.stdout.splitlines()[-1])
    assert line["text"] == "cheap thai near me" and line["model_version"] == ModelFolder.open(tiny_model).version
