"""Helpers shared by the command groups: user errors as one clear line, config files, resolved configs."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Literal

import typer
import yaml
from rich.console import Console

console = Console(stderr=True)
# tables keep their full width when written to a file or pipe (rich would wrap them at 80 columns there)
out_console = Console() if sys.stdout.isatty() else Console(width=200)

# the choices of options several commands share, as types: `--help` lists them and a wrong one exits 2 naming them
# (tests/test_cli.py checks each against the tuple its module validates with)
Backend = Literal["transformers", "vllm"]  # querytune.runtime.backends.BACKENDS
Engine = Literal["local", "ray"]
Preset = Literal["quick", "full"]  # the keys of each training stage's PRESETS
DPOPreset = Literal["quick", "full", "mined"]  # querytune.train.dpo.PRESETS
DemoPreset = Literal["full", "tiny"]  # querytune.demo.PRESETS
Format = Literal["user-compact", "chat-compact", "json", "compact"]  # querytune.runtime.formats.FORMATS
IndexKind = Literal["flat", "hnsw"]  # querytune.search.INDEX_KINDS
Pick = Literal["traffic", "random", "novel"]  # querytune.train.targets.PICKS
ExploreWith = Literal["beam", "branch", "sample"]  # querytune.train.targets.EXPLORE_WITH


FORCE_HELP = "Replace an output folder that is not empty: its contents are removed first (default: refuse it)."


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


@contextmanager
def user_errors():
    """Turn the errors a user can cause into `error: ...` and exit code 2, never a traceback."""
    from querytune.schema import ParseError, SchemaError

    try:
        yield
    except (UserError, SchemaError, ParseError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def named_models(specs: list[str], option: str = "--model") -> list[tuple[str, Path]]:
    """Repeated `--model` values: DIR (named after its folder) or NAME=DIR, in order; names must differ."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec).name, spec)
        if not name or not path:
            raise UserError(f"{option}: expected DIR or NAME=DIR, got {spec!r}")
        if name in dict(out):
            raise UserError(f"{option}: two models named {name!r} (give one as NAME=DIR)")
        out.append((name, Path(path)))
    return out


def load_config(path: Path | None) -> dict[str, Any]:
    """An optional `--config file.yaml`: option name -> value. The command line wins over it."""
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"--config {path}: file not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def prepare_out(
    out: Path,
    force: bool,
    resume: bool = False,
    *,
    inputs: Iterable[Path | None] = (),
    option: str = "--out",
    force_flag: str = "--force",
    resumable: bool = False,
) -> None:
    """Make sure writing into `out` mixes nothing: a missing or empty folder is fine, and so is any with `resume`; one
    that holds anything is refused in one line naming it and `force_flag` (and `--resume` where `resumable`), and with
    `force` its contents are removed first, so no output of an earlier run stays beside the new ones. Removing never
    follows a link out of `out`, and is refused where `out` is a link, a top-level or the temp folder, or holds the
    current folder, home or an input."""
    if force and resume:
        raise UserError(f"{force_flag} and --resume: give one (replace {out}, or continue the run in it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: exists and is not a folder")
    held = sorted(out.iterdir()) if out.is_dir() else []
    if not held or resume:
        return
    if not force:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in held[:3]) + (", ..." if held[3:] else "")
        again = ", or --resume to continue it" if resumable else ""
        raise UserError(
            f"{option} {out}: not empty (it holds {names}); give an empty or new folder, "
            f"or {force_flag} to replace it{again}"
        )
    if out.is_symlink():
        raise UserError(f"{option} {out}: a symbolic link; {force_flag} empties only a folder itself (give its path)")
    if len(out.resolve().parts) <= 2 or out.resolve() == Path(tempfile.gettempdir()).resolve():
        raise UserError(f"{option} {out}: a system folder; {force_flag} empties only a folder of your own")
    for kept in (Path.cwd(), Path.home(), *(p for p in inputs if p is not None)):
        if kept.resolve().is_relative_to(out.resolve()):
            raise UserError(f"{option} {out}: holds {kept}; {force_flag} would remove it (give another folder)")
    for p in held:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)  # links inside are removed, never followed
        else:
            p.unlink()


def write_resolved(config: dict[str, Any], path: Path) -> None:
    """The resolved config, written as JSON beside the outputs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in config.items()}, indent=2) + "\n")
