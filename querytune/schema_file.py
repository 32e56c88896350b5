"""Reading and validating a schema file: YAML in, a `Schema` out, or a `SchemaError` naming the file and the field.

The shape is checked by pydantic models (`SchemaSpec`, its `SlotSpec`s and `IntentSpec`s); the first error in reading
order is the message.

    >>> schema_from_dict({"intents": [{"name": "find"}], "slots": [{"name": "b"}]}, "x.yaml")
    Traceback (most recent call last):
    querytune.schema.SchemaError: x.yaml: slots[0] (b): missing field 'type'
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticKnownError

from querytune.schema import DEFAULT_SCHEMA, FILTERS, SLOT_TYPES, Intent, Schema, SchemaError, Slot, normalize_text

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ABSENT: Any = object()  # the default of a slot's `values`, whose absence and explicit null mean different things


def _is_text(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A scalar's repr, anything else's type: never the repr of a container,
    which an alias bomb makes too big to print."""
    return repr(value) if _is_text(value) else type(value).__name__


def _text(value: Any) -> str:
    """Text, a number read as its digits; never a container (see `_shown`)."""
    if not _is_text(value):
        raise PydanticCustomError("text", "expected a string")
    return str(value)


Text = Annotated[str, PlainValidator(_text)]
OptionalText = Annotated[str, PlainValidator(lambda value: "" if value is None else _text(value))]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _readable_keys(cls, data: Any) -> Any:
        # pydantic reads string keys only, and stops at one holding a lone surrogate; an unknown field either way,
        # listed from the file
        if isinstance(data, dict):
            return {k if isinstance(k, str) and k.isascii() else f"<{type(k).__name__}>": v for k, v in data.items()}
        return data


class _Item(_Spec):
    section: ClassVar[str]  # the list it sits in: "slots" or "intents"
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, name: str, info: ValidationInfo) -> str:
        # the context holds the names met so far, item by item, so that a duplicate is reported at its index among the
        # other errors (a check of the whole list would wait for every item to pass)
        if not _NAME.match(name):
            raise PydanticCustomError("name", "not a name")
        seen = (info.context or {}).get(cls.section, set())
        if name in seen:
            raise PydanticCustomError("duplicate", "duplicate name")
        seen.add(name)
        return name


class SlotSpec(_Item):
    section = "slots"
    type: str
    values: Annotated[list[Text], Field(min_length=1)] = Field(_ABSENT, validate_default=True)
    aliases: Annotated[dict[Any, Any], BeforeValidator(lambda value: value or {})] = {}
    filter: str | None = None
    grounded: bool = False
    description: OptionalText = ""

    @field_validator("type")
    @classmethod
    def _type(cls, type_: str) -> str:
        if type_ not in SLOT_TYPES:
            raise PydanticCustomError("slot_type", "not a slot type")
        return type_

    @field_validator("values", mode="wrap")
    @classmethod
    def _values(cls, values: Any, handler: Any, info: ValidationInfo) -> list[str]:
        if info.data.get("type") != "categorical":  # without a type, the type's own error comes first
            if "type" in info.data and values is not _ABSENT:
                raise PydanticCustomError("values_not_categorical", "only categorical slots take values")
            return []
        if values is _ABSENT:
            raise PydanticKnownError("missing")
        values = handler(values)
        if len({normalize_text(v) for v in values}) != len(values):
            raise PydanticCustomError("values_duplicate", "duplicate values after normalisation")
        return values

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, aliases: dict, info: ValidationInfo) -> dict:
        if "type" not in info.data or "values" not in info.data:
            return aliases  # the type's or the values' own error comes first
        if aliases and info.data["type"] != "categorical":
            raise PydanticCustomError("aliases_not_categorical", "only categorical slots take aliases")
        for i, target in enumerate(
            aliases.values()
        ):  # named by place: pydantic's error context cannot hold a lone surrogate
            if not _is_text(target):
                raise PydanticCustomError("alias_type", "alias target not text", {"alias": i})
            if str(target) not in info.data["values"]:
                raise PydanticCustomError("alias_value", "alias target not a value", {"alias": i})
        return aliases

    @field_validator("filter")
    @classmethod
    def _filter(cls, filter_: str | None) -> str | None:
        if filter_ == "none":  # drives no retrieval filter: the same as leaving `filter` out
            return None
        if filter_ == "attribute:":
            raise PydanticCustomError("filter_column", "'attribute:' needs a column name")
        if filter_ is not None and not filter_.startswith("attribute:") and filter_ not in FILTERS:
            raise PydanticCustomError("filter_value", "not a filter")
        return filter_

    @field_validator("grounded")
    @classmethod
    def _grounded(cls, grounded: bool, info: ValidationInfo) -> bool:
        if grounded and info.data.get("type", "text") not in ("categorical", "text"):
            raise PydanticCustomError("grounded_type", "only categorical and text slots can be grounded")
        return grounded

    def slot(self) -> Slot:
        column = self.filter.split(":", 1)[1] if self.filter and self.filter.startswith("attribute:") else None
        aliases, filter_ = (
            {normalize_text(str(k)): str(v) for k, v in self.aliases.items()},
            "attribute" if column else self.filter,
        )
        return Slot(self.name, self.type, self.description, tuple(self.values), aliases, filter_, column, self.grounded)


class IntentSpec(_Item):
    section = "intents"
    slots: list[str] | None = None  # None: any slot of the schema
    description: OptionalText = ""

    @field_validator("slots")
    @classmethod
    def _declared(cls, slots: list[str] | None, info: ValidationInfo) -> list[str] | None:
        declared = (info.context or {}).get("slots", set(slots or ()))  # the slots' names, met before the intents
        undeclared = [s for s in slots or () if s not in declared]
        if undeclared:
            raise PydanticCustomError("undeclared", "not a declared slot", {"shown": repr(undeclared[0])})
        return slots


class SchemaSpec(_Spec):
    slots: Annotated[list[SlotSpec], BeforeValidator(lambda value: value or [])] = []  # validated before the intents
    intents: list[IntentSpec] = Field(min_length=1)
    name: OptionalText = ""
    description: OptionalText = ""


# The checks in the order the hand-written validation made them: it decides which of several errors is reported.
_FILE_ORDER = ("extra_forbidden", "intents", "slots", "too_short", "slots[]", "intents[]", "name", "description")
_ITEM_ORDER = {
    "slots": ("name", "extra_forbidden", "type", "values", "aliases", "filter", "grounded", "description", "duplicate"),
    "intents": ("name", "duplicate", "extra_forbidden", "slots", "description"),
}
_ITEMS = {"slots": SlotSpec, "intents": IntentSpec}

# Messages by error type (pydantic's own or raised above), or by (field, type) where a field words it differently.
# {where} is the file or the item ("slots[0] (b)"), {got} the input's type, {shown} see `_shown`.
_FILE_MESSAGES = {
    "extra_forbidden": "{where}: unknown top-level field(s) {unknown}",
    "missing": "{where}: missing field '{field}'",
    "list_type": "{where}.intents: expected list, got {got}",
    ("slots", "list_type"): "{where}: slots: expected a list",
    "too_short": "{where}: intents: at least one intent is needed",
    "text": "{where}: {field}: expected a string, got {got}",
}
_NEEDS_VALUES, _SLOT_NAMES = (
    "{where}.values: a categorical slot needs a non-empty list of strings",
    "{where}.slots: expected a list of slot names",
)
_ITEM_MESSAGES = {
    "model_type": "{where}: expected a mapping",
    "missing": "{where}: missing field '{field}'",
    "extra_forbidden": "{where}: unknown field(s) {unknown}",
    "string_type": "{where}.{field}: expected str, got {got}",
    "list_type": "{where}.{field}: expected list, got {got}",
    "text": "{where}.{field}: expected a string, got {got}",
    "duplicate": "{where}.name: duplicate {item} {shown}",
    "name": "{where}.name: {shown} must start with a letter and hold only letters, digits, _",
    "undeclared": "{where}.slots: {shown} is not a declared slot",
    "slot_type": "{where}.type: {shown} is not one of " + ", ".join(SLOT_TYPES),
    ("values", "too_short"): _NEEDS_VALUES,
    ("values", "text"): _NEEDS_VALUES,
    "values_not_categorical": "{where}.values: only categorical slots take values",
    "values_duplicate": "{where}.values: duplicate values after normalisation",
    "dict_type": "{where}.aliases: expected a mapping alias -> value",
    "aliases_not_categorical": "{where}.aliases: only categorical slots take aliases",
    "alias_type": "{where}.aliases.{alias}: expected one of the slot's values, got {got}",
    ("slots", "list_type"): _SLOT_NAMES,
    ("slots", "string_type"): _SLOT_NAMES,
    "alias_value": "{where}.aliases.{alias}: {shown} is not one of the slot's values",
    ("filter", "string_type"): "{where}.filter: expected a string",
    "filter_value": "{where}.filter: {shown} is not one of " + ", ".join(FILTERS) + ":<column>, none",
    "filter_column": "{where}.filter: 'attribute:' needs a column name",
    "bool_type": "{where}.grounded: expected true or false, got {shown}",
    "grounded_type": "{where}.grounded: only categorical and text slots can be grounded",
}


def _order(err: ErrorDetails) -> tuple:
    loc, kind = err["loc"], err["type"]
    if len(loc) == 1:
        return (_FILE_ORDER.index(kind if kind in ("extra_forbidden", "too_short") else str(loc[0])),)
    here = _FILE_ORDER.index(f"{loc[0]}[]"), loc[1]
    if len(loc) == 2:
        return here + (-1,)  # not a mapping
    return here + (_ITEM_ORDER[str(loc[0])].index(kind if kind in ("extra_forbidden", "duplicate") else str(loc[2])),)


def _message(err: ErrorDetails, raw: dict, source: str) -> str:
    """Today's message for one pydantic error: the path names the item by index, then by name once that is valid."""
    loc, kind, value = err["loc"], err["type"], err["input"]
    words = {"got": type(value).__name__, "shown": _shown(value), **err.get("ctx", {})}
    obj, model, where, table, field = raw, SchemaSpec, source, _FILE_MESSAGES, str(loc[0])
    if len(loc) > 1:
        obj, model, where, table = raw[field][loc[1]], _ITEMS[field], f"{source}: {field}[{loc[1]}]", _ITEM_MESSAGES
        words["item"], field = field[:-1], str(loc[2]) if len(loc) > 2 else ""
        if field and field != "name" and kind != "duplicate":
            where += f" ({obj['name']})"
    if kind.startswith("alias_"):
        alias, target = list(obj["aliases"].items())[words["alias"]]
        words.update(alias=str(alias), got=type(target).__name__, shown=_shown(target))
    if kind == "extra_forbidden":
        words["unknown"] = ", ".join(sorted(map(str, set(obj) - set(model.model_fields))))
    template = table.get((field, kind)) or table.get(
        kind, "{where}.{field}: {msg}"
    )  # pydantic's words for an error not foreseen
    return template.format(where=where, field=field, msg=err["msg"], **words)


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
                stack.append(
                    (f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}" if path else str(key), value)
                )
    return None


def schema_from_dict(raw: Any, source: str = "<schema>") -> Schema:
    """A `Schema` from a schema file's content (a mapping), or a `SchemaError` naming `source` and the field."""
    if not isinstance(raw, dict):
        raise SchemaError(f"{source}: expected a mapping with 'intents' and 'slots'")
    huge = _huge_int(raw)
    if huge is not None:
        raise SchemaError(f"{source}: {huge}: a number with more than {sys.get_int_max_str_digits()} digits")
    try:
        spec = SchemaSpec.model_validate(raw, context={"slots": set(), "intents": set()})
    except ValidationError as e:  # its own str() would print the input: never for a file that may hold an alias bomb
        raise SchemaError(_message(min(e.errors(include_url=False), key=_order), raw, source)) from None
    slots = {s.name: s.slot() for s in spec.slots}
    intents = {i.name: Intent(i.name, i.description, None if i.slots is None else tuple(i.slots)) for i in spec.intents}
    schema = Schema(spec.name or Path(source).stem, intents, slots, spec.description)
    bad = _surrogate(schema.to_dict())
    if bad:
        raise SchemaError(
            f"{source}: {bad[0]}: lone surrogate U+{ord(bad[1]):04X} (half a UTF-16 pair, not a character)"
        )
    return schema


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line, what and where: PyYAML's own text spans several, with a drawing of the spot."""
    mark = getattr(e, "problem_mark", None)
    if getattr(e, "problem", None) and mark:
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def load_schema(path: str | Path | None = None) -> Schema:
    """Load a schema YAML file (default: the local-service schema in data/)."""
    path = Path(path) if path else DEFAULT_SCHEMA
    if not path.is_file():
        raise SchemaError(f"{path}: schema file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SchemaError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not UTF-8 text") from None
    except ValueError as e:  # YAML's int and date constructors: a 5,000-digit number, 2001-13-45
        if "integer string conversion" in str(e):
            raise SchemaError(
                f"{path}: not valid YAML: a number with more than {sys.get_int_max_str_digits()} digits"
            ) from None
        raise SchemaError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise SchemaError(f"{path}: not valid YAML: nested too deeply") from None
    except OSError as e:
        raise SchemaError(f"{path}: cannot read: {e.strerror}") from None
    return schema_from_dict(raw, str(path))
