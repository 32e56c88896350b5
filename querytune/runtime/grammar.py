"""The output language of a schema in a format, as one EBNF grammar that both backends decode under.

`ebnf(schema, fmt)` writes the completions `querytune.runtime.formats.completion` can write: an intent, then each slot
the intent takes at most once and in name order (a repeated slot would let a model loop until the token cap), each value
shaped by its slot's type (a categorical value from its list, a short string, true/false, a number). The
transformers backend compiles it with xgrammar (`Constraint`); the vLLM backend hands the same text to vLLM's
structured outputs, whose default engine is xgrammar too, so both backends mask the same tokens at every step.
"""

from __future__ import annotations

import json
from typing import Any

from querytune.runtime.formats import WRITES, completion
from querytune.schema import Schema

TEXT_CHARS = 80  # the longest string value a model may write
# what ends a bare value: control characters and every character Python's \s matches (the reader's `_BARE`)
BARE_STOPS = "\\x00-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # an EBNF string literal has JSON's escapes


def _value(slot, fmt: str) -> str:
    number = '"-"? [0-9]{1,6} ("." [0-9]{1,3})?'
    # no control character: JSON's strings hold none, so the quoted value reads back (`formats.read`)
    quoted = '"\\"" [^"\\\\\\x00-\\x1f]{1,%d} "\\""' % TEXT_CHARS
    if slot.type == "number":
        return number
    if slot.type == "boolean":
        return '("true" | "false")'
    if fmt == "json":
        return (
            "(" + " | ".join(_lit(json.dumps(v, ensure_ascii=False)) for v in slot.values) + ")"
            if slot.type == "categorical"
            else quoted
        )
    if slot.type == "categorical":
        return (
            "("
            + " | ".join(
                _lit(completion("compact", {"intent": "", "slots": {slot.name: v}}).split("=", 1)[1])
                for v in slot.values
            )
            + ")"
        )
    return '([^"=\\\\%s]{1,%d} | %s)' % (BARE_STOPS, TEXT_CHARS, quoted)


def ebnf(schema: Schema, fmt: str) -> str:
    """The grammar of `schema`'s completions in format `fmt` (xgrammar's EBNF, root rule `root`).

    >>> import xgrammar as xgr
    >>> from querytune.schema_file import schema_from_dict
    >>> s = schema_from_dict({"intents": [{"name": "a"}],
    ...                       "slots": [{"name": "n", "type": "number"}, {"name": "b", "type": "boolean"}]})
    >>> ok = lambda fmt, text: xgr.testing._is_grammar_accept_string(ebnf(s, fmt), text)
    >>> [ok("json", '{"intent":"a","slots":{%s}}' % body)
    ...  for body in ('"b":true,"n":2', '"n":2', '"n":2,"n":2', '"n":2,"b":true')]
    [True, True, False, False]
    >>> [ok("compact", text) for text in ("a b n=2", "a n=2", "a n=2 n=2", "a n=2 b", "a b=false")]
    [True, True, False, False, True]
    """
    fmt = WRITES[fmt]  # the grammar is the completion's: formats that write alike share it
    rules = []
    names = sorted(schema.slots)
    for name in names:
        slot = schema.slots[name]
        if fmt == "json":
            rules.append(f"p_{name} ::= {_lit(json.dumps(name) + ':')} {_value(slot, fmt)}")
        elif slot.type == "boolean":
            rules.append(f'p_{name} ::= {_lit(name)} ("=false")?')
        else:
            rules.append(f"p_{name} ::= {_lit(name + '=')} {_value(slot, fmt)}")
    bodies: dict[tuple[str, ...], str] = {}  # intents that take the same slots share one body
    branches = []
    for intent in schema.intents.values():
        takes = tuple(sorted(schema.slots if intent.slots is None else intent.slots))
        if takes not in bodies:
            bodies[takes] = f"body_{len(bodies)}"
            rules += _body(bodies[takes], takes, fmt)
        head = _lit(json.dumps(intent.name) + ',"slots":{') if fmt == "json" else _lit(intent.name)
        branches.append(f"({head} {bodies[takes]})")
    root = " | ".join(branches)
    root = f'"{{\\"intent\\":" ({root}) "}}}}"' if fmt == "json" else root
    return "\n".join([f"root ::= {root}", *rules]) + "\n"


def _body(rule: str, takes: tuple[str, ...], fmt: str) -> list[str]:
    """The slots an intent takes, each at most once, in order: linear in their number for compact (each optional,
    led by a space); for JSON, where the comma goes only between slots, one tail rule per slot (quadratic in size,
    small in practice)."""
    if fmt == "compact":
        return [f"{rule} ::= " + (" ".join(f'(" " p_{n})?' for n in takes) if takes else '""')]
    if not takes:
        return [f'{rule} ::= ""']
    out = [f'{rule} ::= "" | ' + " | ".join(f"(p_{n} {rule}_after_{i})" for i, n in enumerate(takes))]
    for i in range(len(takes)):
        later = [f'("," p_{takes[j]} {rule}_after_{j})' for j in range(i + 1, len(takes))]
        out.append(f"{rule}_after_{i} ::= " + " | ".join(['""', *later]))
    return out


class Constraint:
    """`ebnf(schema, fmt)` compiled once for a tokenizer: token masks for decoding, from xgrammar's compiled matcher."""

    def __init__(self, schema: Schema, fmt: str, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self.xgr, self.vocab_size = xgr, vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id]
        )
        self.compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(ebnf(schema, fmt))

    def matcher(self):
        return self.xgr.GrammarMatcher(self.compiled)

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def mask(self, logits, matchers: list, bitmask) -> None:
        """Set to -inf, in place, each row's logits of tokens its matcher does not allow next."""
        for row, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, row)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask[: len(matchers)].to(logits.device))

    def logits_processor(self, prompt_length: int, prefixes: list[list[int]] | None = None):
        return PrefixLogits(self, prompt_length, prefixes)


class PrefixLogits:
    """A transformers `LogitsProcessor` for `generate()` (sampling, beam search): a row's mask depends only on the
    tokens it has written, so beams that reorder rows stay right. Matchers are kept per written prefix and forked from
    their parent's, one token accepted per step. `prefixes`: per row, completion tokens already written before the
    prompt ends (decoding that resumes a completion part-way, as `Parser.branch` does)."""

    def __init__(self, constraint: Constraint, prompt_length: int, prefixes: list[list[int]] | None = None):
        self.constraint, self.prompt_length, self.prefixes = constraint, prompt_length, prefixes
        self._matchers: dict[tuple[int, ...], Any] = {}
        self._bitmask = None

    def _matcher(self, tokens: tuple[int, ...]):
        m = self._matchers.get(tokens)
        if m is None:
            if not tokens:
                m = self.constraint.matcher()
            else:
                parent = self._matcher(tokens[:-1])
                m = parent.fork() if parent is not None and not parent.is_terminated() else None
                if m is not None and not m.accept_token(tokens[-1]):
                    m = None  # off the grammar, or past its end (padding after a finished row): left as it is
            self._matchers[tokens] = m
        return m

    def __call__(self, input_ids, scores):
        import torch

        if self._bitmask is None or self._bitmask.shape[0] < scores.shape[0]:
            self._bitmask = self.constraint.bitmask(scores.shape[0])
        rows, matchers = [], []
        for row in range(input_ids.shape[0]):
            written = tuple(
                (self.prefixes[row] if self.prefixes else []) + input_ids[row, self.prompt_length :].tolist()
            )
            m = self._matcher(written)
            if m is not None and not m.is_terminated():
                rows.append(row)
                matchers.append(m)
        if rows:
            sub = scores[rows]
            self.constraint.mask(sub, matchers, self._bitmask)
            scores[torch.tensor(rows)] = sub
        return scores
