"""Click evidence for single-slot edits of the model's own parses, pooled over every text that holds the same trigger.

    miner = EditMiner(schema, reward, seed_rows)
    table = miner.mine(texts, greedy, targets)        # one row per tested edit: trigger, support, effect, interval, verdict
    relabeled = miner.apply(texts, greedy, table)     # each text's greedy parse with its accepted edits

`querytune train rft` writes the table as OUT/edits.csv before it trains, for a user to read and veto (`--edits FILE`
trains on a vetoed copy); eval/compare.py audits it against the world's hidden needs.

Candidates (`propose`): for each text, single-slot edits of the greedy parse, each tied to the n-gram of the text
(its trigger) that motivates it:
- `what`: a closed-list "what" value (category, cuisine) that the text writes, or that one of its free n-grams
  embeds near, in place of the parse's value ("pizza" -> cuisine pizza where the parse says italian);
- `swap`: another value of a filter slot the parse holds, on the n-gram that writes the old value, else on each
  free n-gram ("cheap" -> price affordable);
- `add`: a filter the parse lacks, on a free n-gram that embeds near the filter ("for kids" -> kid friendly);
- `name`: the named-business intent with a catalogue name that the text writes ("the gym" as one business, not a
  category). A free n-gram is one whose words no "what"/"where" value of the parse writes, and not all stop words.

Evidence (`TextEvidence`): in each logged context of a text (`querytune.train.targets.text_targets`), the edited
parse's condensed NDCG@10 minus the greedy parse's (`querytune.train.reward.condensed_ndcg`). The reward abstains:
a context counts only where both result lists hold a business the log showed there (off-policy support), and a
text with no such context is unknown, never 0 (`abstain=False` is the ablation that scores them 0).

Verdict (`decide`): an edit (kind, trigger, slot, old value, new value) is accepted for every text that holds it
when its mean effect over the texts with evidence is positive under Benjamini-Hochberg false-discovery control
across all pooled tests (scipy's `false_discovery_control`); otherwise for one text alone, when that text shows
a margin of `text_margin` in each of at least `text_contexts` supported contexts. `pool=False` is the ablation
that accepts any edit a single text's clicks prefer.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from querytune.schema import WORD, ParseError, Schema, normalize_text
from querytune.train.pair_rules import CORE_FILTERS
from querytune.train.reward import NameBook, condensed_ndcg, name_slots

KINDS = ("what", "swap", "add", "name")
STOP = frozenset("a an and are around at by can close do find for from get i in is it me my near nearby of on or "
                 "place places please some that the this to where with".split())
# old and new are JSON cells ("null": absent), so a table read back from CSV keys edits as they were written
TABLE_COLUMNS = ["kind", "trigger", "slot", "old", "new", "route", "text", "proposed", "texts", "contexts", "effect", "low",
                 "high", "p", "q", "accepted"]


@dataclass(frozen=True)
class Edit:
    """One single-slot change of a greedy parse, tied to the trigger n-gram of the text that motivates it. `old` and
    `new` are JSON values (`None`: the slot is absent); a `name` edit sets `slot` (the name slot) and the intent."""

    kind: str
    trigger: str
    slot: str
    old: Any
    new: Any
    intent: str | None = None  # name edits: the named-business intent

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.kind, self.trigger, self.slot, json.dumps(self.old), json.dumps(self.new)

    def apply(self, parse: dict[str, Any], schema: Schema) -> dict[str, Any] | None:
        """The parse with this edit made (canonical), or None where the schema refuses the result."""
        if self.kind == "name":
            keep = {k: v for k, v in parse["slots"].items() if k in schema.slots and schema.slots[k].filter in ("city", "neighborhood")}
            obj = {"intent": self.intent, "slots": {self.slot: self.new, **keep}}
        else:
            slots = {k: v for k, v in parse["slots"].items() if k != self.slot}
            obj = {"intent": parse["intent"], "slots": slots | ({} if self.new is None else {self.slot: self.new})}
        try:
            return schema.parse(obj).to_dict()
        except ParseError:
            return None


@dataclass
class TextEvidence:
    """One proposed edit of one text, with its per-context differences (supported contexts only, unless the
    miner does not abstain) and the number of contexts the text has."""

    text: int  # index into the mined texts
    edit: Edit
    diffs: list[float] = field(default_factory=list)
    contexts: int = 0

    @property
    def effect(self) -> float | None:
        return float(np.mean(self.diffs)) if self.diffs else None


def ngrams(words: list[str], n_max: int) -> list[str]:
    """Every n-gram of 1 to `n_max` words, in order.

    >>> ngrams(["cheap", "thai", "food"], 2)
    ['cheap', 'cheap thai', 'thai', 'thai food', 'food']
    """
    return [" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, min(len(words), i + n_max) + 1)]


class EditMiner:
    """Proposes, scores and decides single-slot edits (module doc). `reward` is a `RetrievalReward` (its searcher
    runs the searches and embeds n-grams); `seed_rows` (labeled rows: `intent`, `slots`) say which intent holds
    a business name and which numbers a number filter takes."""

    def __init__(self, schema: Schema, reward, seed_rows: list[dict[str, Any]], near: int = 2, min_similarity: float = 0.5,
                 alpha: float = 0.05, min_effect: float = 0.0, min_texts: int = 3, text_margin: float = 0.3,
                 text_contexts: int = 3, pool: bool = True, abstain: bool = True):
        self.schema, self.reward = schema, reward
        self.near, self.min_similarity, self.alpha, self.min_effect = near, min_similarity, alpha, min_effect
        self.min_texts, self.text_margin, self.text_contexts, self.pool, self.abstain = min_texts, text_margin, text_contexts, pool, abstain
        slots = schema.slots.values()
        self.what = [s for s in slots if s.filter == "what" and s.type == "categorical"]
        self.core = {s.name for s in slots if s.filter in CORE_FILTERS}
        self.filters = [s for s in slots if s.filter and s.filter not in CORE_FILTERS]
        self.names = name_slots(schema)
        by_intent = Counter(r["intent"] for r in seed_rows if any(n in r["slots"] for n in self.names))
        self.name_intent = by_intent.most_common(1)[0][0] if by_intent else None
        numbers = {s.name: Counter(r["slots"][s.name] for r in seed_rows if s.name in r["slots"]) for s in self.filters if s.type == "number"}
        self.values = {s.name: (list(s.values) if s.type == "categorical" else [True] if s.type == "boolean"
                                else [v for v, _ in numbers.get(s.name, Counter()).most_common(2)]) for s in self.filters}
        catalog = getattr(reward.searcher, "catalog", None)
        self.book = NameBook(catalog["name"]) if catalog is not None and "name" in catalog else None
        self.embedder = getattr(reward.searcher, "embedder", None)
        options = [(s.name, v) for s in self.what for v in s.values] + [(s.name, v) for s in self.filters for v in self.values[s.name]]
        self._options = options
        self._option_vecs = self._embed([self._describe(slot, v) for slot, v in options]) if options else None

    # -- candidates ----------------------------------------------------------------------------------------
    def _describe(self, slot: str, value: Any) -> str:
        s = self.schema.slots[slot]
        if s.type == "boolean":
            return s.name.replace("_", " ")
        if s.filter == "what":
            return str(value).replace("_", " ")
        return f"{value} {s.name.replace('_', ' ')}"

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        return None if self.embedder is None else self.embedder.encode(texts)

    def free_ngrams(self, text: str, parse: dict[str, Any]) -> list[str]:
        """The n-grams (1-2 words) of `text` whose words no "what"/"where" value of the parse writes, not all stop words."""
        words = WORD.findall(normalize_text(text))
        written = set()
        for k, v in parse["slots"].items():
            if k in self.core and isinstance(v, str):
                written |= {w for w in words if self.schema.slots[k].written_in(v, w)}
        spans, run = [], []
        for w in words + [None]:
            if w is None or w in written:
                spans.append(run)
                run = []
            else:
                run.append(w)
        return [g for span in spans for g in ngrams(span, 2) if not set(g.split()) <= STOP]

    def propose(self, texts: list[str], greedy: list[dict[str, Any] | None]) -> list[list[Edit]]:
        """Every text's candidate edits (module doc); a text without a valid greedy parse gets none."""
        free = [self.free_ngrams(t, p) if p else [] for t, p in zip(texts, greedy)]
        grams = sorted({g for fs in free for g in fs})
        near: dict[str, list[tuple[str, Any]]] = {}
        if grams and self._option_vecs is not None:
            sims = self._embed(grams) @ self._option_vecs.T
            for g, row in zip(grams, sims):
                top = [i for i in np.argsort(-row)[: 4 * self.near] if row[i] >= self.min_similarity]
                near[g] = [self._options[i] for i in top]
        out = []
        for text, parse, fs in zip(texts, greedy, free):
            out.append(self._edits(text, parse, fs, near) if parse and parse["intent"] in self.schema.intents
                       and self.schema.intents[parse["intent"]].slots != () else [])
        return out

    def _edits(self, text: str, parse: dict[str, Any], free: list[str], near: dict[str, list[tuple[str, Any]]]) -> list[Edit]:
        slots, edits = parse["slots"], {}

        def add(edit: Edit) -> None:
            if edit.old != edit.new:
                edits.setdefault(edit.key, edit)

        for s in self.what:  # a closed-list "what" value the text writes
            for v in s.values:
                if slots.get(s.name) != v and s.written_in(v, text):
                    add(Edit("what", normalize_text(str(v)), s.name, slots.get(s.name), v))
        for g in free:
            what = [(slot, v) for slot, v in near.get(g, []) if any(s.name == slot for s in self.what)][: self.near]
            for slot, v in what:  # ... or that a free n-gram embeds near
                add(Edit("what", g, slot, slots.get(slot), v))
            added = [(slot, v) for slot, v in near.get(g, []) if slot not in slots and slot in self.values][: self.near]
            for slot, v in added:
                add(Edit("add", g, slot, None, v))
        for s in self.filters:  # another value of a filter the parse holds
            if s.name not in slots:
                continue
            old = slots[s.name]
            triggers = [g for g in free if s.type == "categorical" and s.written_in(old, g)] or free
            for g in triggers:
                for v in self.values[s.name]:
                    add(Edit("swap", g, s.name, old, v))
        if self.book is not None and self.name_intent and parse["intent"] != self.name_intent and self.names:
            words = WORD.findall(normalize_text(text))
            for g in ngrams(words, 4):
                if not set(g.split()) <= STOP and self.book.has(g):
                    add(Edit("name", g, self.names[0], parse["intent"], g, intent=self.name_intent))
        return list(edits.values())

    # -- evidence ------------------------------------------------------------------------------------------
    def evidence(self, texts: list[str], greedy: list[dict[str, Any] | None], proposals: list[list[Edit]],
                 targets: dict[str, dict[str, Any]], progress=None) -> list[TextEvidence]:
        """Each proposed edit of each text with clicks, scored against the greedy parse in the text's contexts."""
        out = []
        for i, (text, parse, edits) in enumerate(zip(texts, greedy, proposals)):
            target = targets.get(normalize_text(text))
            if target is not None and edits:
                contexts = target.get("contexts") or [target]
                base = self.schema.parse(parse)  # proposals exist only for valid parses
                for edit in edits:
                    edited = edit.apply(parse, self.schema)
                    if edited is not None:
                        out.append(TextEvidence(i, edit, self._diffs(base, self.schema.parse(edited), contexts), len(contexts)))
            if progress:
                progress(1)
        return out

    def _diffs(self, base, edited, contexts: list[dict[str, Any]]) -> list[float]:
        diffs = []
        for c in contexts:
            gains = json.loads(c["gains"]) if isinstance(c["gains"], str) else c["gains"]
            a = self.reward.ranked(base, c["user_city"], c["timestamp"])
            b = self.reward.ranked(edited, c["user_city"], c["timestamp"])
            if self.abstain and not (any(x in gains for x in a) and any(x in gains for x in b)):
                continue  # no business the log showed in one of the lists: this context cannot judge them
            diffs.append(condensed_ndcg(b, gains, self.reward.k) - condensed_ndcg(a, gains, self.reward.k))
        return diffs

    # -- verdicts ------------------------------------------------------------------------------------------
    def decide(self, found: list[TextEvidence], proposals: list[list[Edit]], texts: list[str]) -> pd.DataFrame:
        """The edit table (`TABLE_COLUMNS`): one pooled row per tested edit, plus one row per edit accepted for a
        single text (`route` "text"); `accepted` says which apply."""
        from scipy.stats import false_discovery_control, ttest_1samp

        proposed = Counter(e.key for edits in proposals for e in edits)
        by_key: dict[tuple, list[TextEvidence]] = defaultdict(list)
        for ev in found:
            if ev.effect is not None:
                by_key[ev.edit.key].append(ev)
        rows = []
        for key, evs in by_key.items():
            effects = np.array([ev.effect for ev in evs])
            row = self._row(evs[0].edit, "pooled", "", proposed[key], len(evs), sum(len(ev.diffs) for ev in evs), effects.mean())
            if len(evs) >= self.min_texts and self.pool:
                if np.ptp(effects) == 0:  # all alike: the t-test is undefined; a sign test's p
                    row["p"] = 0.5 ** len(effects) if effects[0] > 0 else 1.0
                    row["low"] = row["high"] = round(float(effects[0]), 4)
                else:
                    row["p"] = float(ttest_1samp(effects, 0.0, alternative="greater").pvalue)
                    ci = ttest_1samp(effects, 0.0).confidence_interval(0.95)
                    row["low"], row["high"] = round(float(ci.low), 4), round(float(ci.high), 4)
            rows.append(row)
        tested = [r for r in rows if r["p"] is not None]
        if tested:
            for r, q in zip(tested, false_discovery_control([r["p"] for r in tested], method="bh")):
                r["q"] = round(float(q), 5)
                r["accepted"] = bool(q <= self.alpha and r["effect"] > self.min_effect)
        accepted = {(r["kind"], r["trigger"], r["slot"], r["old"], r["new"]) for r in rows if r["accepted"]}
        for ev in found:  # one text alone: a large margin in several supported contexts
            if ev.edit.key in accepted or ev.effect is None:
                continue
            strong = (len(ev.diffs) >= self.text_contexts and min(ev.diffs) >= self.text_margin) if self.pool else ev.effect > 0
            if strong:
                row = self._row(ev.edit, "text", texts[ev.text], 1, 1, len(ev.diffs), ev.effect)
                row["accepted"] = True
                rows.append(row)
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return table.sort_values(["accepted", "route", "effect"], ascending=[False, True, False], kind="stable").reset_index(drop=True)

    @staticmethod
    def _row(edit: Edit, route: str, text: str, proposed: int, n: int, contexts: int, effect: float) -> dict[str, Any]:
        return {"kind": edit.kind, "trigger": edit.trigger, "slot": edit.slot, "old": edit.key[3], "new": edit.key[4], "route": route,
                "text": text, "proposed": proposed, "texts": n, "contexts": contexts, "effect": round(float(effect), 4),
                "low": None, "high": None, "p": None, "q": None, "accepted": False}

    def mine(self, texts: list[str], greedy: list[dict[str, Any] | None], targets: dict[str, dict[str, Any]],
             progress=None) -> tuple[pd.DataFrame, list[list[Edit]]]:
        """Propose, score and decide (module doc): the edit table and every text's proposals."""
        proposals = self.propose(texts, greedy)
        return self.decide(self.evidence(texts, greedy, proposals, targets, progress), proposals, texts), proposals

    # -- relabeling ----------------------------------------------------------------------------------------
    def apply(self, texts: list[str], greedy: list[dict[str, Any] | None], proposals: list[list[Edit]],
              table: pd.DataFrame) -> list[tuple[dict[str, Any] | None, list[Edit]]]:
        """Each text's greedy parse with the accepted edits it holds (pooled ones wherever proposed, single-text ones
        on their text), at most one per slot, the largest effect first; a name edit stands alone."""
        effect = {}
        for r in table[table["accepted"].astype(bool)].itertuples():
            key = (r.kind, r.trigger, r.slot, r.old, r.new)
            effect[key if r.route == "pooled" else (*key, normalize_text(r.text))] = float(r.effect)
        out = []
        for text, parse, edits in zip(texts, greedy, proposals):
            chosen = sorted(((effect.get(e.key, effect.get((*e.key, normalize_text(text)))), e) for e in edits), key=lambda x: -(x[0] or -1e9))
            chosen = [e for eff, e in chosen if eff is not None]
            if not parse or not chosen:
                out.append((parse, []))
                continue
            if chosen[0].kind == "name":
                out.append((chosen[0].apply(parse, self.schema), [chosen[0]]))
                continue
            done, new = [], parse
            for e in chosen:
                if e.kind == "name" or any(d.slot == e.slot for d in done):
                    continue
                edited = e.apply(new, self.schema)
                if edited is not None:
                    new, done = edited, done + [e]
            out.append((new, done))
        return out

