"""`querytune export`: a model folder as one self-contained merged folder (no base model, no cache needed to load).

querytune export --model runs/sft --out runs/sft-merged
"""

from __future__ import annotations

from pathlib import Path

import typer

from querytune.cli.common import FORCE_HELP, UserError, prepare_out, user_errors


def export(
    model: Path = typer.Option(
        ..., "--model", help="Model folder made by `querytune train ...` (adapters and their base)."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Folder to write: merged transformers weights, tokenizer, schema.yaml, querytune.json.",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Merge a model folder's adapters into its base and write a folder that loads anywhere with no cache."""
    from querytune.runtime.card import write_card
    from querytune.runtime.model import ModelFolder, export_merged

    with user_errors():
        if not model.is_dir():
            raise UserError(f"--model {model}: folder not found")
        if out.resolve() == model.resolve():
            raise UserError("--out must differ from --model")
        prepare_out(out, force, inputs=[model])
        export_merged(model, out)
        write_card(out)
    typer.echo(
        f"exported {model} to {out} with a model card (model_version {ModelFolder.open(out).version}, the same as "
        f"{model}'s: the same weights, so cache entries and labels made with either match)"
    )
