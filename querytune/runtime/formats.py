"""What a model reads and writes: the prompt for a query, the completion for a parse, and reading a completion back.

Four formats; a model folder records its own (`querytune.json` "format"; folders written before formats had a name
are `json`). The API, label files and caches always hold JSON parses: a format is only what the model sees.

    user-compact  (the default) prompt: the tokenizer's chat template over [user: <query>], without a system turn
                  completion: find_business cuisine=thai near_me
    chat-compact  prompt: the chat template over [system: "<schema name> parser", user: <query>]; the compact completion
    json          the chat-compact prompt
                  completion: {"intent":"find_business","slots":{"cuisine":"thai","near_me":true}}
    compact       prompt: <query> and a newline, no template; the compact completion

Compact completions, slot by slot in name order: `name=value`; a true boolean is its bare name, a false one
`name=false`; a value with a space, `=`, `"` or `\\` (or an empty one) is JSON-quoted, so reading is exact. About 14
tokens where JSON takes 25 (world test set); the template adds about 15 tokens to the query's 7, 8 without its system
turn. Measured on world seed 0 (eval/RESULTS.md, "Labeling and serving benchmarks"), vLLM against json, the same 280
steps: chat-compact 1.6x and user-compact 1.8x at the same accuracy; compact 2.1x, but 3.7 points of intent accuracy
lower, so the template's user turn stays. The grammar of each format (what constrained decoding allows) is in
`querytune.runtime.grammar`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from querytune.query import MAX_QUERY_CHARS
from querytune.schema import Parse, ParseError, Schema

SYSTEM_PROMPT = "{name} parser"
DEFAULT_FORMAT = "user-compact"
# each format's identity, part of every model_version: bump it when what the model reads or writes changes
IDENTITY = {
    "json": "querytune-format-1",
    "compact": "querytune-compact-1",
    "chat-compact": "querytune-chat-compact-1",
    "user-compact": "querytune-user-compact-1",
}
FORMATS = tuple(IDENTITY)
# each format as (prompt, completion): what the model reads and what it writes are chosen apart
PROMPT = {"json": "chat", "compact": "bare", "chat-compact": "chat", "user-compact": "user"}
WRITES = {"json": "json", "compact": "compact", "chat-compact": "compact", "user-compact": "compact"}
_BARE = re.compile(r'[^\s="\\]+')


def folder_format(meta: dict[str, Any]) -> str:
    """The format a model folder's `querytune.json` records (`json` for folders from before formats were named)."""
    fmt = meta.get("format", "json")
    if fmt not in IDENTITY:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)} (a newer querytune wrote this folder?)")
    return fmt


def prompt(fmt: str, schema: Schema, tokenizer, text: str) -> str:
    """The prompt for one query, as text (tokenised without special tokens)."""
    text = text[:MAX_QUERY_CHARS]
    if PROMPT[fmt] == "bare":
        return text + "\n"
    system = [{"role": "system", "content": SYSTEM_PROMPT.format(name=schema.name)}]
    chat = tokenizer.apply_chat_template(
        system + [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    if PROMPT[fmt] == "chat":
        return chat
    # the user turn alone: templates such as SmolLM2's add a default system turn when none is given, so the system
    # turn is rendered and cut off rather than left out
    head = tokenizer.apply_chat_template(system, tokenize=False)
    if not chat.startswith(head):
        raise ValueError(f"format {fmt}: this tokenizer's chat template does not render the system turn as a prefix")
    return chat[len(head) :]


def completion(fmt: str, parse: Parse | dict[str, Any]) -> str:
    """The completion for a parse (without the end-of-sequence token), slots in name order.

    >>> p = {"intent": "find_business",
    ...      "slots": {"near_me": True, "cuisine": "thai", "neighborhood": "old town", "min_rating": 4.5}}
    >>> completion("json", p)
    '{"intent":"find_business","slots":{"cuisine":"thai","min_rating":4.5,"near_me":true,"neighborhood":"old town"}}'
    >>> completion("compact", p)
    'find_business cuisine=thai min_rating=4.5 near_me neighborhood="old town"'
    """
    d = (
        parse.to_dict()
        if isinstance(parse, Parse)
        else {"intent": parse["intent"], "slots": dict(sorted(parse["slots"].items()))}
    )
    if WRITES[fmt] == "json":
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"))
    items = [d["intent"]]
    for name, value in d["slots"].items():
        if value is True:
            items.append(name)
        elif value is False:
            items.append(f"{name}=false")
        elif isinstance(value, str):
            items.append(
                f"{name}={value}" if _BARE.fullmatch(value) else f"{name}={json.dumps(value, ensure_ascii=False)}"
            )
        else:
            items.append(f"{name}={json.dumps(value)}")
    return " ".join(items)


def read(fmt: str, schema: Schema, raw: str) -> Parse:
    """A completion back as a validated `Parse` (ParseError naming the problem otherwise).

    >>> from querytune.schema_file import load_schema
    >>> read("compact", load_schema(), 'find_business cuisine=thai near_me neighborhood="back bay"').to_dict()
    {'intent': 'find_business', 'slots': {'cuisine': 'thai', 'near_me': True, 'neighborhood': 'back bay'}}
    """
    if WRITES[fmt] == "json":
        return schema.parse(raw)
    intent, _, rest = raw.strip().partition(" ")
    slots: dict[str, Any] = {}
    pos = 0
    while pos < len(rest):
        m = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(=?)").match(rest, pos)
        if not m:
            raise ParseError(
                f"compact output: expected a slot name at char {len(intent) + 1 + pos}: {rest[pos : pos + 20]!r}"
            )
        name, pos = m.group(1), m.end()
        if name in slots:
            raise ParseError(f"slots.{name}: written twice")
        slot = schema.slots.get(name)
        if not m.group(2):
            if slot is not None and slot.type != "boolean":
                raise ParseError(f"slots.{name}: a bare name is a true boolean, but {name} is {slot.type}")
            slots[name] = True
        elif rest.startswith('"', pos):
            try:
                value, end = json.JSONDecoder().raw_decode(rest, pos)
            except json.JSONDecodeError as e:
                raise ParseError(f"slots.{name}: bad quoted value: {e.msg}") from None
            slots[name], pos = value, end
        else:
            v = _BARE.match(rest, pos)
            if not v:
                raise ParseError(f"slots.{name}: empty value")
            value, pos = v.group(0), v.end()
            slots[name] = (
                json.loads(value)
                if slot is not None and slot.type in ("boolean", "number") and _is_json_scalar(value)
                else value
            )
        if pos < len(rest):
            if rest[pos] != " ":
                raise ParseError(f"slots.{name}: expected a space after the value at char {len(intent) + 1 + pos}")
            pos += 1
    return schema.parse({"intent": intent, "slots": slots})


def _is_json_scalar(value: str) -> bool:
    try:
        json.loads(value)
        return True
    except ValueError:
        return False
