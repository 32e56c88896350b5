"""The typed config every training stage reads (`SFTRecipe`, `RFTRecipe`, `DPORecipe`, `GRPORecipe`): a frozen
dataclass whose presets are instances (`PRESETS["quick"] | {"max_steps": 2}` is a checked copy); a config file's keys
and then the command line's options replace fields, and a key the stage does not know is an error naming
the known ones."""

from __future__ import annotations

import dataclasses
from typing import Any, Self


@dataclasses.dataclass(frozen=True)
class Recipe:
    def resolve(self, overrides: dict[str, Any], source: str = "option") -> Self:
        """This config with `overrides` (None: unset, so the preset's value stays)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown {source}(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def __or__(self, overrides: dict[str, Any]) -> Self:
        """`recipe | {"max_steps": 2}`: the dict-merge spelling of `resolve`, checked alike."""
        return self.resolve(overrides)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
