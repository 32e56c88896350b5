"""The README stays short, its links and the docs' links resolve, and its cheap commands run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

# Commands of the README's shell blocks that this test does not run, each with why (the whole loop, the whole suite).
EXPENSIVE = {
    "make demo": "the whole loop: about 58 minutes on 2 cores (eval/demo_full.json)",
    "make demo-tiny": "the loop on a small world: about 5 minutes (tests/test_cli.py checks its commands' options)",
    "make test": "the whole test suite, its environments built first",
}
# What this test runs: `querytune` commands that read the package's own data or write a small world, in seconds.
# A README command that is neither this nor in EXPENSIVE fails the test, so a new one cannot go unnoticed.
CHEAP = re.compile(r"querytune( --help| schema show| world sample| world make .*--rows (\d+))(\s|$)")
MAX_CHEAP_ROWS = 5_000
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced code block."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        fence = re.match(r"\s*```(\S*)", line)
        if fence and lang is None:
            lang, lines = fence.group(1).lower(), []
        elif fence:
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, "an unclosed code block"
    return blocks


def shell_commands(text: str) -> list[str]:
    """The commands of the shell blocks, one a line (continuations joined), comments and prompts taken off."""
    commands = []
    for lang, lines in fenced_blocks(text):
        if lang not in SHELL_LANGS:
            first_words = {(line.split() or [""])[0] for line in lines}
            assert not first_words & {"querytune", "make", "python", "$"}, (
                f"a ```{lang} block holds commands: tag it ```bash"
            )
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line.removeprefix("$ "), comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def classify(command: str) -> str:
    if command in EXPENSIVE:
        return "skip"
    cheap = CHEAP.match(command + " ")
    if cheap and (cheap.group(2) is None or int(cheap.group(2)) <= MAX_CHEAP_ROWS):
        return "run"
    return "unknown"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.+)", line)
        if heading and not fenced:
            slug = _slug(heading.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(path: Path) -> list[str]:
    """Targets of the markdown links outside code blocks that are neither URLs nor mail addresses."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def test_readme_is_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; move the detail into docs/ (at most {MAX_README_LINES})"
    )


def test_relative_links_of_readme_and_docs_point_to_files_that_exist():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ holds no page"
    assert sum(len(relative_links(p)) for p in pages) > 10
    for page in (ROOT / "docs").glob("*.md"):  # the README lists every docs page
        assert f"](docs/{page.name}" in README.read_text(), f"README.md's Documentation list misses docs/{page.name}"
    broken = {str(p.relative_to(ROOT)): broken_links(p) for p in pages}
    assert not {p: b for p, b in broken.items() if b}, broken


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# There\n\n## A: section's title\n")
    page.write_text(
        "[ok](there.md#a-sections-title) [gone](missing.md) [bad anchor](there.md#nope) "
        "[web](https://example.com) `[code](nowhere.md)`\n"
    )
    assert broken_links(page) == ["missing.md: no such file", "there.md#nope: no heading #nope in there.md"]


def test_every_readme_command_is_run_or_listed_as_expensive():
    commands = shell_commands(README.read_text())
    assert "make demo" in commands and "make test" in commands
    unknown = [c for c in commands if classify(c) == "unknown"]
    assert not unknown, f"README commands this test neither runs nor skips: {unknown}; add them to EXPENSIVE or CHEAP"
    stale = set(EXPENSIVE) - set(commands)
    assert not stale, f"EXPENSIVE lists commands the README no longer shows: {stale}"
    assert classify("querytune train sft --data x --out y") == "unknown"
    assert classify("querytune world make --out w --rows 120000") == "unknown"


def test_readme_cheap_commands_run_as_written(tmp_path):
    cheap = [c for c in shell_commands(README.read_text()) if classify(c) == "run"]
    assert any(c.startswith("querytune schema show") for c in cheap), cheap
    for name in ("data", "querytune"):  # paths in the README are relative to the checkout; outputs land in tmp_path
        (tmp_path / name).symlink_to(ROOT / name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    for command in cheap:  # in README order: `world sample` reads what `world make` wrote
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (
            f"`{command}` exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
        assert done.stdout.strip(), f"`{command}` printed nothing"
