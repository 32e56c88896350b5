"""The label schema: intents and slots from a YAML file, and everything derived from it.

A schema file declares intents (name, description, optionally the slots each takes) and slots
(name, type, description, the retrieval filter it drives); `querytune.schema_file` reads and validates one.
From it come:

* ``Schema.parse(obj)`` -> a validated, canonicalised ``Parse`` (intent + slots), or ``ParseError``
  naming the offending field;
* ``Schema.json_schema()`` -> the JSON schema of a parse (as files and the API hold it);
* ``Schema.version`` -> a short hash of the schema's content that outputs and caches carry.

    querytune schema show [--schema data/schema.yaml]
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidfuzz.distance import OSA

DEFAULT_SCHEMA = Path(__file__).resolve().parent / "data" / "schema.yaml"  # package data; data/schema.yaml links here
SLOT_TYPES = ("text", "categorical", "boolean", "number")
# Filters the structured search knows (querytune.search). `what` slots are embedded, the rest filter.
FILTERS = ("what", "city", "neighborhood", "near_me", "price", "open", "day", "min_rating", "attribute")


class SchemaError(ValueError):
    """A schema file that cannot be used; the message names the file and field."""


class ParseError(ValueError):
    """A parse (label or model output) that does not fit the schema; the message names the field."""


def normalize_text(text: str) -> str:
    """NFKC, lower case, collapsed whitespace: the only normalisation values ever get.

    >>> normalize_text("  Cheap\\u00a0THAI   food ")
    'cheap thai food'
    """
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


WORD = re.compile(r"[^\W_]+")


def is_grounded(value: str, text: str) -> bool:
    """Whether the query writes `value`: each of its words is a word of the query, up to the typos people
    make (one edit in words of 4-6 letters, two in longer ones; a swap of neighbours counts as one: rapidfuzz's optimal
    string alignment distance).

    >>> is_grounded("la jolla", "thai in la joela"), is_grounded("the rustic fork", "the rustci fork hours")
    (True, True)
    >>> is_grounded("williamsburg", "wellness vision bos hours"), is_grounded("chelsea", "yoga appt today chi")
    (False, False)
    """
    words = WORD.findall(normalize_text(text))
    for w in WORD.findall(normalize_text(value)):
        limit = 0 if len(w) <= 3 else 1 if len(w) <= 6 else 2
        if not any(abs(len(w) - len(q)) <= limit and OSA.distance(w, q, score_cutoff=limit) <= limit for q in words):
            return False
    return True


@dataclass(frozen=True)
class Slot:
    name: str
    type: str
    description: str = ""
    values: tuple[str, ...] = ()  # categorical only, canonical spellings
    aliases: dict[str, str] = field(default_factory=dict)  # normalised alias -> canonical value
    filter: str | None = None  # which retrieval filter this slot drives, see FILTERS
    attribute: str | None = None  # for filter == "attribute": the catalog attribute column
    grounded: bool = False  # the value must be written in the query (see `is_grounded`)

    def written_in(self, value: Any, text: str) -> bool:
        """Whether `text` writes `value` or one of its aliases (see `is_grounded`)."""
        return any(
            is_grounded(form, text) for form in [str(value)] + [a for a, v in self.aliases.items() if v == value]
        )

    def canonical(self, value: Any) -> Any:
        """Canonical form of one value, or ParseError."""
        where = f"slots.{self.name}"
        if self.type == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and normalize_text(value) in ("true", "yes"):
                return True
            if isinstance(value, str) and normalize_text(value) in ("false", "no"):
                return False
            raise ParseError(f"{where}: expected a boolean, got {value!r}")
        if self.type == "number":
            if isinstance(value, bool):
                raise ParseError(f"{where}: expected a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ParseError(f"{where}: expected a number, got {value!r}") from None
            if number != number or number in (float("inf"), float("-inf")):
                raise ParseError(f"{where}: expected a finite number, got {value!r}")
            return int(number) if number.is_integer() else number
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ParseError(f"{where}: expected a string, got {value!r}")
        text = normalize_text(str(value))
        if not text:
            raise ParseError(f"{where}: empty value")
        if self.type == "text":
            return text
        text = normalize_text(self.aliases.get(text, text))  # alias targets are canonical spellings
        for allowed in self.values:
            if normalize_text(allowed) == text:
                return allowed
        shown = ", ".join(self.values[:12]) + (", ..." if len(self.values) > 12 else "")
        raise ParseError(f"{where}: {value!r} is not one of the allowed values ({shown})")


@dataclass(frozen=True)
class Intent:
    name: str
    description: str = ""
    slots: tuple[str, ...] | None = None  # None: any slot of the schema


@dataclass(frozen=True)
class Parse:
    """One validated, canonicalised parse: an intent and its slot values."""

    intent: str
    slots: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"intent": self.intent, "slots": dict(sorted(self.slots.items()))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Schema:
    name: str
    intents: dict[str, Intent]
    slots: dict[str, Slot]
    description: str = ""

    @property
    def version(self) -> str:
        """Hash of the schema's content (not its file bytes): comments and layout don't change it."""
        payload = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        slots = []
        for s in self.slots.values():
            d: dict[str, Any] = {"name": s.name, "type": s.type, "description": s.description}
            if s.values:
                d["values"] = list(s.values)
            if s.aliases:
                d["aliases"] = dict(sorted(s.aliases.items()))
            if s.filter:
                d["filter"] = s.filter if s.filter != "attribute" else f"attribute:{s.attribute}"
            if s.grounded:
                d["grounded"] = True
            slots.append(d)
        intents = []
        for i in self.intents.values():
            d = {"name": i.name, "description": i.description}
            if i.slots is not None:
                d["slots"] = list(i.slots)
            intents.append(d)
        return {"name": self.name, "description": self.description, "intents": intents, "slots": slots}

    def parse(self, obj: Any) -> Parse:
        """Validate and canonicalise ``{"intent": ..., "slots": {...}}`` (a dict or a JSON string)."""
        if isinstance(obj, (str, bytes)):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise ParseError(f"not valid JSON: {e.msg} at char {e.pos}") from None
        if not isinstance(obj, dict):
            raise ParseError(f"expected an object with 'intent' and 'slots', got {type(obj).__name__}")
        extra = set(obj) - {"intent", "slots"}
        if extra:
            raise ParseError(f"unexpected top-level field(s): {', '.join(sorted(extra))}")
        intent = obj.get("intent")
        if not isinstance(intent, str) or intent not in self.intents:
            names = list(self.intents)
            shown = f"(one of: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
            if intent in (None, ""):
                raise ParseError(f"intent: missing {shown}")
            raise ParseError(f"intent: {intent!r} is not an intent of schema {self.name!r} {shown}")
        slots_in = obj.get("slots", {})
        if slots_in is None:
            slots_in = {}
        if not isinstance(slots_in, dict):
            raise ParseError(f"slots: expected an object, got {type(slots_in).__name__}")
        allowed = self.intents[intent].slots
        slots: dict[str, Any] = {}
        for name, value in slots_in.items():
            if name not in self.slots:
                raise ParseError(f"slots.{name}: not a slot of schema {self.name!r}")
            if allowed is not None and name not in allowed:
                raise ParseError(f"slots.{name}: intent {intent!r} does not take this slot")
            if value is None:
                continue  # an explicit null means "not said"
            slots[name] = self.slots[name].canonical(value)
        return Parse(intent, dict(sorted(slots.items())))

    def ground(self, parse: Parse, text: str) -> tuple[Parse, dict[str, Any]]:
        """Drop the values of `grounded` slots that the query does not write (see `is_grounded`).

        Returns the grounded parse and the dropped values. A model that reads "harmony care" as
        neighbourhood "harmony" or invents "williamsburg" for "bos hours" loses that slot, not the parse.
        """
        kept, dropped = {}, {}
        for name, value in parse.slots.items():
            if not self.slots[name].grounded or self.slots[name].written_in(value, text):
                kept[name] = value
            else:
                dropped[name] = value
        return Parse(parse.intent, kept), dropped

    def json_schema(self) -> dict[str, Any]:
        """JSON schema of a parse as files and the API hold it (`schema show --json-schema`); slots listed by name, the
        order parses are written in. Decoding is constrained by `querytune.runtime.grammar`, not by this."""
        props: dict[str, Any] = {}
        for s in sorted(self.slots.values(), key=lambda s: s.name):
            if s.type == "categorical":
                props[s.name] = {"type": "string", "enum": list(s.values)}
            elif s.type == "boolean":
                props[s.name] = {"type": "boolean"}
            elif s.type == "number":
                props[s.name] = {"type": "number"}
            else:
                props[s.name] = {"type": "string", "minLength": 1}
        return {
            "type": "object",
            "properties": {
                "intent": {"type": "string", "enum": list(self.intents)},
                "slots": {"type": "object", "properties": props, "additionalProperties": False},
            },
            "required": ["intent", "slots"],
            "additionalProperties": False,
        }
