"""Constrained decoding to the schema's JSON for the transformers backend.

The completion language is a regular one: {"intent":"<intent>","slots":{"<slot>":<value>,...}} with each
value shaped by its slot's type (a categorical value from its list, a quoted string, true/false, a number)
and each slot at most once, in name order (the order `completion_text` writes; a repeated slot would let a
model loop until the token cap).
`schema_regex` writes it as one regular expression; `JsonSchemaLogits` keeps, at each step, only the
tokens among the model's `top_k` best that leave the output a prefix of that language (partial matching
of the `regex` package), and allows end-of-turn only once the output is complete. Checking the top
candidates first keeps it cheap on CPU; only when none of them fits is the rest of the vocabulary searched.
"""

from __future__ import annotations

import json

import regex
from transformers import LogitsProcessor

from querytune.schema import Schema

TEXT_VALUE = r'"[^"\\\n]{1,80}"'
NUMBER_VALUE = r"-?[0-9]{1,6}(\.[0-9]{1,3})?"


def _alt(options: list[str]) -> str:
    return "(?:" + "|".join(regex.escape(json.dumps(o, ensure_ascii=False)) for o in sorted(options, key=len, reverse=True)) + ")"


def schema_regex(schema: Schema) -> str:
    """The completions of `schema` as one regular expression: each slot at most once, in the order parses are
    written (by name, see `completion_text`), as in `Schema.json_schema`.

    >>> from querytune.schema import schema_from_dict
    >>> s = schema_from_dict({"intents": [{"name": "a"}], "slots": [{"name": "n", "type": "number"}, {"name": "b", "type": "boolean"}]})
    >>> [bool(regex.fullmatch(schema_regex(s), '{"intent":"a","slots":{%s}}' % body)) for body in ('"b":true,"n":2', '"n":2', '"n":2,"n":2', '"n":2,"b":true')]
    [True, True, False, False]
    """
    pairs = {}
    for slot in schema.slots.values():
        if slot.type == "categorical":
            value = _alt(list(slot.values))
        elif slot.type == "boolean":
            value = "(?:true|false)"
        elif slot.type == "number":
            value = NUMBER_VALUE
        else:
            value = TEXT_VALUE
        pairs[slot.name] = regex.escape(json.dumps(slot.name)) + ":" + value
    branches = []
    for intent in schema.intents.values():  # each intent with only the slots it takes
        names = sorted(schema.slots if intent.slots is None else intent.slots)
        # one optional group per slot, in order, led by a comma unless it opens the object (no value ends with "{"):
        # linear in the number of slots, where nesting the optional tails would be exponential
        body = "".join(r"(?:(?:(?<=\{)|(?<!\{),)" + pairs[n] + ")?" for n in names)
        branches.append(regex.escape(json.dumps(intent.name)) + r',"slots":\{' + body + r"\}")
    return r'\{"intent":(?:' + "|".join(branches) + r")\}"


class JsonSchemaLogits(LogitsProcessor):
    """Keeps generation inside `schema_regex`. `prefixes`: per row, completion text already written before the
    prompt ends (decoding that resumes a completion part-way, as `Parser.branch` does)."""

    def __init__(self, schema: Schema, tokenizer, prompt_length: int, top_k: int = 24, prefixes: list[str] | None = None):
        self.pattern = regex.compile(schema_regex(schema))
        self.tokenizer, self.prompt_length, self.top_k, self.prefixes = tokenizer, prompt_length, top_k, prefixes
        self.eos = tokenizer.eos_token_id
        self._pieces: dict[int, str] = {}
        self._fit: dict[tuple[str, int], bool] = {}

    def piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._pieces[token]

    def _fits(self, text: str, tokens: list[int]) -> list[int]:
        keep = []
        for token in tokens:
            key = (text, token)
            if key not in self._fit:  # beams and batch rows share prefixes ('{"intent":"find_business","slots":{"...')
                if token == self.eos:
                    self._fit[key] = self.pattern.fullmatch(text) is not None
                else:
                    self._fit[key] = self.pattern.fullmatch(text + self.piece(token), partial=True) is not None
            if self._fit[key]:
                keep.append(token)
        return keep

    def __call__(self, input_ids, scores):
        import torch

        top = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).indices.tolist()  # a full sort per row costs more than the model
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_length:].tolist()
            if self.eos in generated:
                continue  # finished rows only receive padding
            text = (self.prefixes[row] if self.prefixes else "") + self.tokenizer.decode(generated, skip_special_tokens=True)
            keep = self._fits(text, top[row])
            if not keep:  # rare: nothing in the top k fits; look further
                ranked = torch.argsort(scores[row], descending=True)
                for start in range(self.top_k, len(ranked), 1024):
                    keep = self._fits(text, ranked[start:start + 1024].tolist())
                    if keep:
                        break
            if keep:
                mask = torch.full_like(scores[row], float("-inf"))
                mask[keep] = 0.0
                scores[row] = scores[row] + mask
        return scores
