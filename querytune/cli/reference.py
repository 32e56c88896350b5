"""The CLI reference (docs/cli.md), generated from the commands' own `--help` text.

python -m querytune.cli.reference            # print it
python -m querytune.cli.reference --write    # replace the part of docs/cli.md between the markers (`make readme`)
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _commands(group, prefix: str) -> list[tuple[str, object]]:
    if hasattr(group, "commands"):  # a group (typer vendors its own click: duck-typed)
        out = []
        for name in sorted(group.commands):
            out += _commands(group.commands[name], f"{prefix} {name}")
        return out
    return [(prefix, group)]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    from querytune.cli import app

    root = typer.main.get_command(app)
    lines = []
    for path, command in _commands(root, "querytune"):
        params = [p for p in command.params if p.name != "help"]
        args = " ".join((p.metavar or p.name).upper() for p in params if p.param_type_name == "argument")
        lines += [f"## `{path}{' ' + args if args else ''}`", "", _cell((command.help or "").split("\n\n")[0]), ""]
        rest = (command.help or "").split("\n\n")[1:]
        if rest:
            lines += [_cell(" ".join(rest)), ""]
        if params:
            lines += ["| argument / option | default | what it does |", "|---|---|---|"]
            for p in params:
                if p.param_type_name == "argument":
                    name, default, help_ = (p.metavar or p.name).upper(), "", getattr(p, "help", "") or ""
                else:
                    name = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
                    default = "" if p.default in (None, [], ()) or p.required else f"`{p.default}`"
                    default = "required" if p.required else default
                    help_ = p.help or ""
                lines.append(f"| {name if name.startswith('`') else f'`{name}`'} | {default} | {_cell(help_)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def doc_with_reference(doc: str) -> str:
    """`doc` with the part between the markers replaced by the current reference."""
    if START not in doc or END not in doc:
        raise ValueError(f"docs/cli.md has no {START} ... {END} markers")
    head, rest = doc.split(START, 1)
    return head + START + "\n" + reference() + END + rest.split(END, 1)[1]


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(doc_with_reference(DOC.read_text()))
        print(f"wrote the CLI reference into {DOC}")
    else:
        print(reference(), end="")
