"""The exploration bucket: a small share of requests, chosen by a stable hash, answered with a parse drawn from a
known proposal and logged with its probability, so that the next training round can learn what the greedy parse
never shows (new words: drift) and an off-policy estimate can judge a new model before it serves (docs/loop.md).

Who is in the bucket (`Explorer.uniforms`): blake2b over (salt, normalised query, time bucket) gives two uniforms;
the first below `share` puts the request in the bucket, the second draws its answer. The same query in the same
time bucket gets the same answer (a user who types it again sees the same page); another salt draws another bucket.

The proposal (`Explorer.proposal`): the greedy parse keeps probability `keep`; the rest is spread evenly over the
greedy parse's single-slot candidate edits that give another valid parse (`querytune.edits.EditProposer`, the
miner's own candidates: a "what" value a free n-gram of the text embeds near, a filter a free n-gram embeds near, a
catalogue name the text writes), with a wider neighbourhood than the miner's (`near`, `min_similarity`: a new word
such as "washeteria" sits at cosine 0.44 from "laundromat"). Given the labeled texts the model was taught from
(`known`: their words), only edits whose trigger holds a word none of them writes are proposed: the bucket is spent
on the words a human label never taught (drift, slang), not on re-checking what the guideline already says, and a
request without such a word is served its greedy parse (on world v2 a quarter of requests hold one). Without
`known`, every candidate edit but a filter's other value. With no candidate the greedy parse is served with
probability one. The probabilities sum to one and are logged with the
answer (`policy: explore`, `propensity`, `candidates`). An exploratory answer is never written to the parse cache:
the cache only ever holds greedy parses, so nothing exploratory can be warmed or promoted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from querytune.edits import STOP
from querytune.schema import WORD, Schema, normalize_text

EXPLORE_NEAR, EXPLORE_MIN_SIMILARITY = 3, 0.3


@dataclass(frozen=True)
class Draw:
    """One exploratory answer: the parse served, its probability and every candidate's (`parse`, `p`), greedy first."""

    parse: dict[str, Any]
    propensity: float
    candidates: list[dict[str, Any]]

    def fields(self) -> dict[str, Any]:
        """What an answered row carries besides its parse."""
        return {"policy": "explore", "propensity": self.propensity, "candidates": self.candidates}


def canonical(parse: dict[str, Any]) -> str:
    """A parse as one string, equal for equal parses (how served and candidate parses are matched)."""
    return json.dumps(parse, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def known_words(texts) -> frozenset[str]:
    """The words a set of texts writes (normalised as the edits' triggers are)."""
    return frozenset(w for t in texts for w in WORD.findall(normalize_text(t)))


class Explorer:
    """Chooses the bucket's requests and draws their answers (module doc). `proposer` is an `EditProposer` (see
    `for_index`); None proposes nothing, so every bucket request is served its greedy parse with probability one.
    `known`: the words of the labeled texts the model learned from (None: explore every word)."""

    def __init__(
        self,
        schema: Schema,
        share: float,
        proposer=None,
        salt: str = "querytune",
        bucket_s: int = 3600,
        keep: float = 0.5,
        known: frozenset[str] | None = None,
    ):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"explore share: {share} is not between 0 and 1")
        if not 0.0 < keep < 1.0:
            raise ValueError(f"explore keep: {keep} is not between 0 and 1 (both excluded)")
        if bucket_s < 1:
            raise ValueError(f"explore bucket: {bucket_s} s; give at least 1")
        self.schema, self.share, self.proposer = schema, share, proposer
        self.salt, self.bucket_s, self.keep = salt, int(bucket_s), keep
        self.known = None if known is None else frozenset(known) | STOP

    @classmethod
    def for_index(
        cls,
        schema: Schema,
        index_dir: str | Path,
        share: float,
        embedder=None,
        seed_rows: list[dict[str, Any]] | None = None,
        **options,
    ) -> Explorer:
        """An explorer whose candidates come from an index's catalogue (its names) and the index's embedder.
        `seed_rows` (labeled rows) say which intent names a business, as they do for the miner, and their texts' words
        are the known ones (class doc); without them, the intent the schema alone gives the name slot, if one does
        (else no name candidates), and every word is explored."""
        import pandas as pd

        from querytune.edits import EditProposer, name_slots
        from querytune.search import Embedder

        path = Path(index_dir) / "catalog.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"{index_dir}: no catalog.parquet here (an index folder from `querytune index build`)"
            )
        catalog = pd.read_parquet(path, columns=["name"])
        source = SimpleNamespace(catalog=catalog, embedder=embedder or Embedder())
        proposer = EditProposer(
            schema, source, seed_rows or [], near=EXPLORE_NEAR, min_similarity=EXPLORE_MIN_SIMILARITY
        )
        if proposer.name_intent is None:
            names = set(name_slots(schema))
            takes = [i.name for i in schema.intents.values() if i.slots and names & set(i.slots)]
            proposer.name_intent = takes[0] if len(takes) == 1 else None
        if seed_rows and "known" not in options:
            options["known"] = known_words(r["text"] for r in seed_rows if r.get("text"))
        return cls(schema, share, proposer, **options)

    def uniforms(self, norm: str, at: float) -> tuple[float, float]:
        """Two uniforms in [0, 1) for a normalised query at a time (epoch seconds): bucket, then draw."""
        key = f"{self.salt}\x00{norm}\x00{int(at // self.bucket_s)}".encode()
        digest = hashlib.blake2b(key, digest_size=16).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:], "big") / 2.0**64

    def chosen(self, norm: str, at: float) -> bool:
        """Whether this request is in the bucket."""
        return self.share > 0.0 and self.uniforms(norm, at)[0] < self.share

    def proposal(self, text: str, greedy: dict[str, Any]) -> list[dict[str, Any]]:
        """The candidates (`parse`, `p`) for a text whose greedy parse is `greedy`: greedy first (module doc)."""
        edited: dict[str, dict[str, Any]] = {}
        if self.proposer is not None:
            for edit in self.proposer.propose([text], [greedy])[0]:
                if edit.kind == "swap" or (self.known is not None and set(edit.trigger.split()) <= self.known):
                    continue
                parse = edit.apply(greedy, self.schema)
                if parse is not None and canonical(parse) != canonical(greedy):
                    edited.setdefault(canonical(parse), parse)
        if not edited:
            return [{"parse": greedy, "p": 1.0}]
        rest = (1.0 - self.keep) / len(edited)
        return [{"parse": greedy, "p": self.keep}] + [{"parse": p, "p": rest} for _, p in sorted(edited.items())]

    def draw(self, norm: str, text: str, greedy: dict[str, Any], at: float) -> Draw:
        """The answer of a bucket request: a candidate drawn by the request's second uniform."""
        candidates = self.proposal(text, greedy)
        u, cumulative = self.uniforms(norm, at)[1], 0.0
        pick = candidates[-1]
        for c in candidates:
            cumulative += c["p"]
            if u < cumulative:
                pick = c
                break
        return Draw(pick["parse"], pick["p"], candidates)
