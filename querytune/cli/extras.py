"""A missing extra as one line: the commands import what an extra installs (transformers, trl, uvicorn, ray, ...)
only when they run, so `querytune` itself needs only the core dependencies, and a command whose extra is not
installed stops with `error: querytune serve needs the 'serve' extra (no module named 'uvicorn'): pip install
'querytune[serve]'` and exit code 2, not a traceback. Which module belongs to which extra is read from the installed
package's metadata (pyproject's optional-dependencies), so the two never disagree. A module of no extra that fails to
import is a bug, and keeps its traceback. The console script (`querytune.cli.main`) catches the error; `demo`, whose
steps are processes of their own, checks its extras before its first step."""

from __future__ import annotations

import importlib.util
import re
from functools import cache

# a distribution whose import name is not its name with "-" as "_"
IMPORT_NAMES = {"scikit-learn": "sklearn", "pytrec-eval-terrier": "pytrec_eval"}


@cache
def extra_modules() -> dict[str, list[str]]:
    """Each extra of querytune -> the top-level modules it installs (an extra that names another, as `train` names
    `runtime`, includes its modules), in pyproject's order; {} where querytune is not installed."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("querytune") or []
    except PackageNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for req in reqs:  # e.g. 'uvicorn[standard]==0.54.0; extra == "serve"'
        found = re.match(r"\s*([A-Za-z0-9._-]+)(?:\[([^\]]*)\])?[^;]*;.*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if not found:
            continue  # a core dependency
        name, inner, extra = found[1].lower(), found[2], found[3]
        modules = out.setdefault(extra, [])
        if name == "querytune":
            modules += [m for sub in (inner or "").split(",") for m in out.get(sub.strip(), [])]
        else:
            modules.append(IMPORT_NAMES.get(name, re.sub(r"[-.]", "_", name)))
    return out


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The first extra that installs the module `error` could not import, where that module is indeed not installed;
    None for any other module (a bug: let its traceback show)."""
    top = (error.name or "").split(".")[0]
    extra = next((e for e, modules in extra_modules().items() if top in modules), None)
    return extra if extra and importlib.util.find_spec(top) is None else None


def needs(command: str, extras: list[str], module: str | None = None) -> str:
    """The one line: `querytune serve needs the 'serve' extra (no module named 'uvicorn'): pip install ...`."""
    names = " and ".join(", ".join(f"'{e}'" for e in extras).rsplit(", ", 1))
    why = f" (no module named {module!r})" if module else ""
    s = "s" if len(extras) > 1 else ""
    return f"{command} needs the {names} extra{s}{why}: pip install 'querytune[{','.join(extras)}]'"


def missing_extras(*extras: str) -> list[str]:
    """Those of `extras` with a module that is not installed (checked without importing anything)."""
    known = extra_modules()
    return [e for e in extras if any(importlib.util.find_spec(m) is None for m in known.get(e, []))]
