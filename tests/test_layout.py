"""The package's import graph: no cycles, and the product's code never imports the simulated world.

Every import counts: at module level or inside a function, absolute or relative."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "querytune"
# what may import the simulator: itself, its command, and the helpers that build worlds for tests and scripts
MAY_IMPORT_WORLD = ("querytune.world", "querytune.cli.world", "querytune.testing", "querytune.demo")
# the loop's order: a package imports its own modules and those of lower layers only; train, labeling and serving,
# side by side, never import each other (the shared pieces: schema, query, hours, labeled files, search)
LAYERS = {
    "querytune.world.traffic": 4,  # the world's users on the product: runs the serving service in process
    "querytune.world": 1,
    "querytune.runtime": 1,
    "querytune.train": 2,
    "querytune.labeling": 2,
    "querytune.serving": 2,
    "querytune.evaluation": 3,
    "querytune.cli": 4,
    "querytune.demo": 4,
    "querytune.testing": 4,
}
MAX_LINES = 600  # lines as `ruff format` writes them (a typer option is five of them)


def layer(module: str) -> tuple[int, str]:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank, prefix
    return 0, "querytune"


def module_name(path: Path, package_root: Path = PACKAGE) -> str:
    parts = path.relative_to(package_root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package_root: Path = PACKAGE) -> set[str]:
    """The querytune modules `path` imports (a `from package import name` counts the submodule when there is one)."""
    name, found = module_name(path, package_root), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "querytune"}


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        g.add_edges_from((name, m) for m in imports(path) if m in modules and m != name)
    return g


def test_the_import_walker_sees_function_level_and_relative_imports(tmp_path):
    assert "querytune.search" in imports(PACKAGE / "world" / "log.py")
    fake = tmp_path / "querytune" / "world" / "probe.py"  # a copy of the package's shape, not a file in its source
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..search import Bm25\n    from . import vocab\n")
    assert {"querytune.search", "querytune.world.vocab"} <= imports(fake, tmp_path / "querytune")


def test_no_import_cycle(graph):
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert cycles == [], f"modules that import each other: {cycles}"


def test_search_serving_and_training_never_import_the_simulator(graph):
    offenders = sorted(
        (a, b) for a, b in graph.edges if b.startswith("querytune.world") and not a.startswith(MAY_IMPORT_WORLD)
    )
    assert offenders == []


def test_imports_go_down_the_loop(graph):
    def upward(a: str, b: str) -> bool:
        (ra, pa), (rb, pb) = layer(a), layer(b)
        return rb > ra or (rb == ra and pa != pb and 0 < ra < 4)

    offenders = sorted((a, b) for a, b in graph.edges if upward(a, b))
    assert offenders == [], "imports up the loop or sideways between packages"


def test_labeling_and_serving_share_only_what_a_query_is(graph):
    """The server and the offline labeler are two wings: neither imports the other, and both take what a query is
    from `querytune.query` (the cache stores, in serving, never import the labeler that fills them)."""
    across = sorted(
        (a, b) for a, b in graph.edges if {layer(a)[1], layer(b)[1]} == {"querytune.labeling", "querytune.serving"}
    )
    assert across == []
    for wing in ("querytune.serving.service", "querytune.labeling.log_input"):
        assert "querytune.query" in set(graph.successors(wing)), wing
    definers = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if any(d in path.read_text() for d in ("def check_query(", "MAX_QUERY_CHARS =", "def lone_surrogate("))
    )
    assert definers == ["querytune/query.py"]


def test_no_module_over_the_limit():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: split them by what they do"


def test_every_import_of_a_querytune_name_resolves():
    """A name moved to another module breaks its importers only when the import runs: a function-level import, or a
    script under eval/ that no test imports. Every `from querytune... import name` in the package, the tests, eval/
    and serving/ must name something its module holds."""
    import importlib

    root = PACKAGE.parent
    broken = []
    for path in sorted(
        [
            *PACKAGE.rglob("*.py"),
            *(root / "tests").glob("*.py"),
            *(root / "eval").glob("*.py"),
            *(root / "serving").glob("*.py"),
        ]
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "querytune":
                if node.module.endswith("vllm_backend"):
                    continue  # needs vLLM, which lives in its own environment (tests/test_vllm.py imports it there)
                module = importlib.import_module(node.module)
                for alias in node.names:
                    submodule = (
                        hasattr(module, "__path__")
                        and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                    )
                    if not hasattr(module, alias.name) and not submodule:
                        broken.append(f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}")
    assert broken == []
