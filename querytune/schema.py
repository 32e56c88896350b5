"""The label schema: intents and slots from a YAML file, and everything derived from it.

A schema file declares intents (name, description, optionally the slots each takes) and slots
(name, type, description, the retrieval filter it drives). From it come:

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
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rapidfuzz.distance import OSA

MAX_QUERY_CHARS = 256  # longest query accepted (labeling, serving) and put in a prompt: longer "queries" are pasted documents
DEFAULT_SCHEMA = Path(__file__).resolve().parent / "data" / "schema.yaml"  # package data; data/schema.yaml links here
SLOT_TYPES = ("text", "categorical", "boolean", "number")
# Filters the structured search knows (querytune.search). `what` slots are embedded, the rest filter.
FILTERS = ("what", "city", "neighborhood", "near_me", "price", "open", "day", "min_rating", "attribute")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


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
        return any(is_grounded(form, text) for form in [str(value)] + [a for a, v in self.aliases.items() if v == value])

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
            raise ParseError(f"intent: {intent!r} is not an intent of schema {self.name!r}")
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


def _req(d: dict, key: str, where: str, kind: type = str) -> Any:
    if key not in d:
        raise SchemaError(f"{where}: missing field '{key}'")
    if not isinstance(d[key], kind):
        raise SchemaError(f"{where}.{key}: expected {kind.__name__}, got {type(d[key]).__name__}")
    return d[key]


def _text(d: dict, key: str, field: str) -> str:
    """An optional free-text field: text (a number is read as its digits), never a container, which an alias bomb
    could make too big to print."""
    value = d.get(key)
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise SchemaError(f"{field}: expected a string, got {type(value).__name__}")
    return str(value)


def _surrogate(tree: Any, path: str = "") -> tuple[str, str] | None:
    """(field, character) of the first lone surrogate (YAML's "\\ud800" escape) in `tree`, a validated schema's
    `to_dict`: no UTF-8 file or version hash can hold one."""
    if isinstance(tree, str):
        bad = next((c for c in tree if "\ud800" <= c <= "\udfff"), None)
        return (path, bad) if bad else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        field = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = _surrogate(key, field) or _surrogate(value, field)
        if found:
            return found
    return None


def _huge_int(tree: Any) -> str | None:
    """The field of the first int in `tree` too long for Python to print (YAML reads 0x... and 0777... past the
    decimal digit limit), each shared node visited once (an alias bomb is a few nodes) and without recursion."""
    limit = sys.get_int_max_str_digits()
    if not limit:
        return None
    bound, seen, stack = 10**limit, set(), [("", tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, int) and not isinstance(node, bool) and abs(node) >= bound:
            return path
        if isinstance(node, (dict, list)) and id(node) not in seen:
            seen.add(id(node))
            items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            for key, value in reversed(items):
                if isinstance(node, dict) and isinstance(key, int) and not isinstance(key, bool) and abs(key) >= bound:
                    return f"{path}: a key" if path else "a key"
                stack.append((f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}" if path else str(key), value))
    return None


def _name(d: dict, where: str) -> str:
    name = _req(d, "name", where)
    if not _NAME.match(name):
        raise SchemaError(f"{where}.name: {name!r} must start with a letter and hold only letters, digits, _")
    return name


def _slot(d: Any, where: str) -> Slot:
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected a mapping")
    name = _name(d, where)
    where = f"{where} ({name})"
    unknown = set(d) - {"name", "type", "description", "values", "aliases", "filter", "grounded"}
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    type_ = _req(d, "type", where)
    if type_ not in SLOT_TYPES:
        raise SchemaError(f"{where}.type: {type_!r} is not one of {', '.join(SLOT_TYPES)}")
    values: tuple[str, ...] = ()
    if type_ == "categorical":
        raw = _req(d, "values", where, list)
        if not raw or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in raw):
            raise SchemaError(f"{where}.values: a categorical slot needs a non-empty list of strings")
        values = tuple(str(v) for v in raw)
        normal = [normalize_text(v) for v in values]
        if len(set(normal)) != len(normal):
            raise SchemaError(f"{where}.values: duplicate values after normalisation")
    elif "values" in d:
        raise SchemaError(f"{where}.values: only categorical slots take values")
    aliases = d.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise SchemaError(f"{where}.aliases: expected a mapping alias -> value")
    if aliases and type_ != "categorical":
        raise SchemaError(f"{where}.aliases: only categorical slots take aliases")
    for alias, target in aliases.items():
        if not isinstance(target, (str, int, float)) or isinstance(target, bool):  # never str() a container: alias bombs
            raise SchemaError(f"{where}.aliases.{alias}: expected one of the slot's values, got {type(target).__name__}")
        if str(target) not in values:
            raise SchemaError(f"{where}.aliases.{alias}: {target!r} is not one of the slot's values")
    filter_ = d.get("filter")
    attribute = None
    if filter_ is not None:
        if not isinstance(filter_, str):
            raise SchemaError(f"{where}.filter: expected a string")
        if filter_.startswith("attribute:"):
            filter_, attribute = "attribute", filter_.split(":", 1)[1]
            if not attribute:
                raise SchemaError(f"{where}.filter: 'attribute:' needs a column name")
        if filter_ not in FILTERS:
            raise SchemaError(f"{where}.filter: {filter_!r} is not one of {', '.join(FILTERS)}")
    grounded = d.get("grounded", False)
    if not isinstance(grounded, bool):
        shown = repr(grounded) if isinstance(grounded, (str, int, float)) else type(grounded).__name__
        raise SchemaError(f"{where}.grounded: expected true or false, got {shown}")
    if grounded and type_ not in ("categorical", "text"):
        raise SchemaError(f"{where}.grounded: only categorical and text slots can be grounded")
    return Slot(
        name=name, type=type_, description=_text(d, "description", f"{where}.description"), values=values,
        aliases={normalize_text(str(k)): str(v) for k, v in aliases.items()}, filter=filter_, attribute=attribute,
        grounded=grounded,
    )


def schema_from_dict(raw: Any, source: str = "<schema>") -> Schema:
    if not isinstance(raw, dict):
        raise SchemaError(f"{source}: expected a mapping with 'intents' and 'slots'")
    huge = _huge_int(raw)
    if huge is not None:
        raise SchemaError(f"{source}: {huge}: a number with more than {sys.get_int_max_str_digits()} digits")
    unknown = set(raw) - {"name", "description", "intents", "slots"}
    if unknown:
        raise SchemaError(f"{source}: unknown top-level field(s) {', '.join(sorted(map(str, unknown)))}")
    intents_raw = _req(raw, "intents", source, list)
    slots_raw = raw.get("slots") or []
    if not isinstance(slots_raw, list):
        raise SchemaError(f"{source}: slots: expected a list")
    if not intents_raw:
        raise SchemaError(f"{source}: intents: at least one intent is needed")
    slots: dict[str, Slot] = {}
    for i, d in enumerate(slots_raw):
        slot = _slot(d, f"{source}: slots[{i}]")
        if slot.name in slots:
            raise SchemaError(f"{source}: slots[{i}].name: duplicate slot {slot.name!r}")
        slots[slot.name] = slot
    intents: dict[str, Intent] = {}
    for i, d in enumerate(intents_raw):
        where = f"{source}: intents[{i}]"
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: expected a mapping")
        name = _name(d, where)
        if name in intents:
            raise SchemaError(f"{where}.name: duplicate intent {name!r}")
        unknown = set(d) - {"name", "description", "slots"}
        if unknown:
            raise SchemaError(f"{where} ({name}): unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        taken = d.get("slots")
        if taken is not None:
            if not isinstance(taken, list) or not all(isinstance(s, str) for s in taken):
                raise SchemaError(f"{where} ({name}).slots: expected a list of slot names")
            for s in taken:
                if s not in slots:
                    raise SchemaError(f"{where} ({name}).slots: {s!r} is not a declared slot")
            taken = tuple(taken)
        intents[name] = Intent(name, _text(d, "description", f"{where} ({name}).description"), taken)
    schema = Schema(_text(raw, "name", f"{source}: name") or Path(source).stem, intents, slots, _text(raw, "description", f"{source}: description"))
    bad = _surrogate(schema.to_dict())
    if bad:
        raise SchemaError(f"{source}: {bad[0]}: lone surrogate U+{ord(bad[1]):04X} (half a UTF-16 pair, not a character)")
    return schema


def load_schema(path: str | Path | None = None) -> Schema:
    """Load a schema YAML file (default: the local-service schema in data/)."""
    path = Path(path) if path else DEFAULT_SCHEMA
    if not path.is_file():
        raise SchemaError(f"{path}: schema file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SchemaError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not UTF-8 text") from None
    except ValueError as e:  # YAML's int and date constructors: a 5,000-digit number, 2001-13-45
        if "integer string conversion" in str(e):
            raise SchemaError(f"{path}: not valid YAML: a number with more than {sys.get_int_max_str_digits()} digits") from None
        raise SchemaError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise SchemaError(f"{path}: not valid YAML: nested too deeply") from None
    except OSError as e:
        raise SchemaError(f"{path}: cannot read: {e.strerror}") from None
    return schema_from_dict(raw, str(path))
