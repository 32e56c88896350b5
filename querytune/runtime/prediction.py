"""What a parse of a query is: a generated completion read in its format, validated against the schema,
grounded in the query.

Every backend (`querytune.runtime.generate`, `querytune.runtime.vllm_backend`) turns its completions into `Prediction`s
through `validate_output`: an invalid output comes back as invalid with the reason, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from querytune.runtime.formats import read
from querytune.schema import ParseError, Schema


@dataclass
class Prediction:
    text: str
    parse: dict[str, Any] | None  # {"intent", "slots"}, canonical; None when invalid
    valid: bool
    confidence: float
    raw: str  # what the model generated
    error: str | None = None
    ungrounded: dict[str, Any] | None = None  # values of grounded slots the query does not write, dropped


def validate_output(
    schema: Schema, text: str, raw: str, logprob: float, finished: bool, max_new_tokens: int, fmt: str = "json"
) -> Prediction:
    """A generated completion in format `fmt` as a `Prediction`: read and checked by the schema, grounded in the query
    (every backend validates its outputs here, so they agree on what counts as valid)."""
    import math

    confidence = math.exp(logprob)
    if not finished:
        return Prediction(text, None, False, confidence, raw, f"output cut at {max_new_tokens} tokens")
    try:
        parse, dropped = schema.ground(read(fmt, schema, raw), text)
    except ParseError as e:
        return Prediction(text, None, False, confidence, raw, str(e))
    return Prediction(text, parse.to_dict(), True, confidence, raw, ungrounded=dropped or None)
