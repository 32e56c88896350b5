"""Model backends for labeling and serving: one interface, greedy schema-constrained parses of a batch of texts.

`transformers` (any machine): `querytune.runtime.generate.Parser`, the adapters merged, decoding constrained to the
schema's JSON. `vllm`: see `querytune.runtime.vllm_backend` (vLLM with JSON-schema structured outputs).
Both carry `model_version` (a hash of the model's weights, `querytune.runtime.model.ModelFolder.version`) and
`schema_version`, which labels and cache keys hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from querytune.runtime.model import ModelFolder

BACKENDS = ("transformers", "vllm")  # vllm: querytune/runtime/vllm_backend.py, its own environment (`make vllm-env`)


class TransformersBackend:
    """The in-process transformers model of a folder (see `Parser`)."""

    name = "transformers"

    def __init__(
        self, model_dir: str | Path | ModelFolder, batch_size: int = 32, constrained: bool = True, int8: bool = False
    ):
        from querytune.runtime.generate import Parser

        self.parser = Parser(model_dir, batch_size=batch_size, constrained=constrained, int8=int8)
        self.model_dir = str(self.parser.folder.path)
        self.model_version = self.parser.model_version
        self.schema = self.parser.schema
        self.schema_version = self.schema.version

    def parse(self, texts: list[str]) -> list[Any]:
        return self.parser.parse(texts)


def load_backend(kind: str, model_dir: str | Path | ModelFolder, **options: Any):
    """A backend by name (`BACKENDS`) for a model folder (a path, or a `ModelFolder` already read)."""
    if kind == "transformers":
        return TransformersBackend(model_dir, **options)
    if kind == "vllm":
        from querytune.runtime.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, **options)
    raise ValueError(f"unknown backend {kind!r} (choose from {', '.join(BACKENDS)})")


def parse_many(backend, texts: list[str], step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Each text's greedy answer (a Prediction) from a backend, in chunks of 256 (`step(n)` after each). On the
    transformers backend decoded freely first and inside the grammar only where that is invalid (as RFT's
    `self_labels`: a valid free output used only tokens the grammar allows, so the constrained decoding the server
    runs writes the same), in about half the time."""
    parser = getattr(backend, "parser", None)
    out: dict[str, Any] = {}
    free = parser is not None and parser.constrained
    if free:
        parser.constrained = False
    try:
        for i in range(0, len(texts), 256):
            chunk = texts[i : i + 256]
            out.update(zip(chunk, backend.parse(chunk)))
            if step:
                step(len(chunk))
    finally:
        if free:
            parser.constrained = True
    redo = [t for t, p in out.items() if not p.valid] if free else []
    for i in range(0, len(redo), 256):
        out.update(zip(redo[i : i + 256], backend.parse(redo[i : i + 256])))
    return out
