"""Click evidence for single-slot edits of the model's own parses, pooled over every text that holds the same trigger.

    miner = EditMiner(schema, reward, seed_rows)
    table = miner.mine(texts, greedy, targets)  # one row per tested edit: trigger, support, effect, interval, verdict
    relabeled = miner.apply(texts, greedy, table)  # each text's greedy parse with its accepted edits

`querytune train rft` writes the table as OUT/edits.csv before it trains, for a user to read and veto (`--edits FILE`
trains on a vetoed copy); eval/compare.py audits it against the world's hidden needs.

Candidates: `querytune.edits` (`EditProposer.propose`).

Evidence (`TextEvidence`): in each logged context of a text (`querytune.train.targets.text_targets`), the edited
parse's condensed NDCG@10 minus the greedy parse's (`querytune.train.reward.condensed_ndcg`). The reward abstains:
a context counts only where both result lists hold a business the log showed there (off-policy support), and a
text with no such context is unknown, never 0 (`abstain=False` is the ablation that scores them 0).

Verdict (`decide`): an edit (kind, trigger, slot, old value, new value) is accepted for every text that holds it
when its mean effect over the texts with evidence is positive under Benjamini-Hochberg false-discovery control
(scipy's `false_discovery_control`). A single-text route (off by default, `text_contexts=0`: where the log holds
no evidence it lets noise through; eval/RESULTS.md) also accepts an edit for one text alone that shows a margin of
`text_margin` in each of at least `text_contexts` supported contexts. `pool=False` is the ablation that accepts any edit
a single text's clicks prefer. In two stages (`screened`, then `decide`'s `confirmation`): the training texts screen the
edits (pooled p at most `screen_p`), and only those are tested, on other log texts that hold their triggers: a
thousand edits tested at once leave a real one (pizza, p 2e-4 over 14 texts) above the corrected threshold.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from querytune.edits import Edit, EditProposer
from querytune.schema import Schema, normalize_text
from querytune.train.reward import condensed_ndcg

# old and new are JSON cells ("null": absent), so a table read back from CSV keys edits as they were written
TABLE_COLUMNS = [
    "kind",
    "trigger",
    "slot",
    "old",
    "new",
    "route",
    "text",
    "proposed",
    "texts",
    "contexts",
    "effect",
    "low",
    "high",
    "p",
    "screened",
    "confirm_texts",
    "confirm_effect",
    "confirm_low",
    "confirm_high",
    "confirm_p",
    "q",
    "accepted",
]


def supported_diffs(reward, base, edited, contexts: list[dict[str, Any]], abstain: bool = True) -> list[float]:
    """`edited`'s condensed NDCG@10 minus `base`'s in each of a text's logged contexts. Abstaining, only the contexts
    where both result lists hold a business the log showed there count: the others cannot judge the two parses."""
    diffs = []
    for c in contexts:
        gains = json.loads(c["gains"]) if isinstance(c["gains"], str) else c["gains"]
        a = reward.ranked(base, c["user_city"], c["timestamp"])
        b = reward.ranked(edited, c["user_city"], c["timestamp"])
        if abstain and not (any(x in gains for x in a) and any(x in gains for x in b)):
            continue
        diffs.append(condensed_ndcg(b, gains, reward.k) - condensed_ndcg(a, gains, reward.k))
    return diffs


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


class EditMiner(EditProposer):
    """Proposes (`EditProposer`), scores and decides single-slot edits (module doc). `reward` is a `RetrievalReward`
    (its searcher runs the searches and embeds n-grams)."""

    def __init__(
        self,
        schema: Schema,
        reward,
        seed_rows: list[dict[str, Any]],
        near: int = 2,
        min_similarity: float = 0.5,
        alpha: float = 0.05,
        min_effect: float = 0.0,
        min_texts: int = 3,
        text_margin: float = 0.3,
        text_contexts: int = 0,
        pool: bool = True,
        abstain: bool = True,
        screen_p: float = 0.05,
        click_values: bool = False,
    ):
        super().__init__(schema, reward.searcher, seed_rows, near, min_similarity)
        self.click_values = click_values  # also propose the values a text's clicks point to (`EditProposer.propose`)
        self.reward, self.alpha, self.min_effect, self.min_texts = reward, alpha, min_effect, min_texts
        self.text_margin, self.text_contexts, self.pool, self.abstain, self.screen_p = (
            text_margin,
            text_contexts,
            pool,
            abstain,
            screen_p,
        )

    # -- evidence ------------------------------------------------------------------------------------------
    def evidence(
        self,
        texts: list[str],
        greedy: list[dict[str, Any] | None],
        proposals: list[list[Edit]],
        targets: dict[str, dict[str, Any]],
        progress=None,
    ) -> list[TextEvidence]:
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
                        out.append(
                            TextEvidence(
                                i,
                                edit,
                                supported_diffs(self.reward, base, self.schema.parse(edited), contexts, self.abstain),
                                len(contexts),
                            )
                        )
            if progress:
                progress(1)
        return out

    # -- verdicts ------------------------------------------------------------------------------------------
    def _pooled(self, found: list[TextEvidence]) -> dict[tuple, dict[str, Any]]:
        """Per edit key: its first edit, the texts with evidence, their contexts, mean effect, 95% interval and the
        one-sided p of a positive mean (t-test over texts; all-equal effects: a sign test's p), when it has
        `min_texts` texts with evidence."""
        from scipy.stats import ttest_1samp

        by_key: dict[tuple, list[TextEvidence]] = defaultdict(list)
        for ev in found:
            if ev.effect is not None:
                by_key[ev.edit.key].append(ev)
        out = {}
        for key, evs in by_key.items():
            effects = np.array([ev.effect for ev in evs])
            stats = {
                "edit": evs[0].edit,
                "texts": len(evs),
                "contexts": sum(len(ev.diffs) for ev in evs),
                "effect": round(float(effects.mean()), 4),
                "low": None,
                "high": None,
                "p": None,
            }
            if len(evs) >= self.min_texts:
                if np.ptp(effects) == 0:
                    stats |= {
                        "p": 0.5 ** len(effects) if effects[0] > 0 else 1.0,
                        "low": round(float(effects[0]), 4),
                        "high": round(float(effects[0]), 4),
                    }
                else:
                    ci = ttest_1samp(effects, 0.0).confidence_interval(0.95)
                    stats |= {
                        "p": float(ttest_1samp(effects, 0.0, alternative="greater").pvalue),
                        "low": round(float(ci.low), 4),
                        "high": round(float(ci.high), 4),
                    }
            out[key] = stats
        return out

    def screened(self, found: list[TextEvidence]) -> set[tuple]:
        """The edit keys whose pooled evidence on these texts is positive at p <= `screen_p` (not yet corrected): the
        candidates a confirmation on other texts (`decide`'s `confirmation`) tests."""
        return self._screen(self._pooled(found))

    def _screen(self, pooled: dict[tuple, dict[str, Any]]) -> set[tuple]:
        return (
            {k for k, st in pooled.items() if st["p"] is not None and st["p"] <= self.screen_p and st["effect"] > 0}
            if self.pool
            else set()
        )

    def decide(
        self,
        found: list[TextEvidence],
        proposals: list[list[Edit]],
        texts: list[str],
        confirmation: list[TextEvidence] | None = None,
    ) -> pd.DataFrame:
        """The edit table (`TABLE_COLUMNS`): one pooled row per edit scored on these texts, plus one row per edit
        accepted for a single text (`route` "text"); `accepted` says which apply. Without `confirmation`, the
        pooled tests of every edit go through Benjamini-Hochberg at `alpha` together. With it (the evidence of the
        `screened` edits on other log texts), only screened edits are tested, on the confirmation texts alone: a
        screen on one sample and a test on another keep the false-discovery control while testing far fewer edits."""
        from scipy.stats import false_discovery_control

        proposed = Counter(e.key for edits in proposals for e in edits)
        first = self._pooled(found)
        second = self._pooled(confirmation) if confirmation is not None else {}
        screened = self._screen(first) if confirmation is not None else set()
        rows = []
        for key, st in first.items():
            row = self._row(st["edit"], "pooled", "", proposed[key], st["texts"], st["contexts"], st["effect"])
            row |= {k: st[k] for k in ("low", "high", "p")} if self.pool else {}
            row["screened"] = key in screened
            if key in second:
                row |= {f"confirm_{k}": second[key][k] for k in ("texts", "effect", "low", "high", "p")}
            rows.append(row)
        column = "confirm_p" if confirmation is not None else "p"
        tested = [r for r in rows if r.get(column) is not None]
        if tested:
            for r, q in zip(tested, false_discovery_control([r[column] for r in tested], method="bh")):
                r["q"] = round(float(q), 5)
                r["accepted"] = bool(
                    q <= self.alpha and r["confirm_effect" if confirmation is not None else "effect"] > self.min_effect
                )
        accepted = {(r["kind"], r["trigger"], r["slot"], r["old"], r["new"]) for r in rows if r["accepted"]}
        for ev in found:  # one text alone: a large margin in several supported contexts (text_contexts 0: never)
            if ev.edit.key in accepted or ev.effect is None:
                continue
            if self.pool:
                strong = 0 < self.text_contexts <= len(ev.diffs) and min(ev.diffs) >= self.text_margin
            else:
                strong = ev.effect > 0
            if strong:
                row = self._row(ev.edit, "text", texts[ev.text], 1, 1, len(ev.diffs), ev.effect)
                row["accepted"] = True
                rows.append(row)
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return table.sort_values(
            ["accepted", "route", "effect"], ascending=[False, True, False], kind="stable"
        ).reset_index(drop=True)

    @staticmethod
    def _row(edit: Edit, route: str, text: str, proposed: int, n: int, contexts: int, effect: float) -> dict[str, Any]:
        return {
            "kind": edit.kind,
            "trigger": edit.trigger,
            "slot": edit.slot,
            "old": edit.key[3],
            "new": edit.key[4],
            "route": route,
            "text": text,
            "proposed": proposed,
            "texts": n,
            "contexts": contexts,
            "effect": round(float(effect), 4),
            "low": None,
            "high": None,
            "p": None,
            "screened": False,
            "confirm_texts": None,
            "confirm_effect": None,
            "confirm_low": None,
            "confirm_high": None,
            "confirm_p": None,
            "q": None,
            "accepted": False,
        }

    def mine(
        self, texts: list[str], greedy: list[dict[str, Any] | None], targets: dict[str, dict[str, Any]], progress=None
    ) -> tuple[pd.DataFrame, list[list[Edit]]]:
        """Propose, score and decide (module doc): the edit table and every text's proposals."""
        proposals = self.propose(texts, greedy, targets if self.click_values else None)
        return self.decide(self.evidence(texts, greedy, proposals, targets, progress), proposals, texts), proposals

    # -- relabeling ----------------------------------------------------------------------------------------
    def apply(
        self, texts: list[str], greedy: list[dict[str, Any] | None], proposals: list[list[Edit]], table: pd.DataFrame
    ) -> list[tuple[dict[str, Any] | None, list[Edit]]]:
        """Each text's greedy parse with the accepted edits it holds (pooled ones wherever proposed, single-text ones
        on their text), at most one per slot, the largest effect first; a name edit stands alone."""
        effect = {}
        for r in table[table["accepted"].astype(bool)].itertuples():
            key = (r.kind, r.trigger, r.slot, r.old, r.new)
            effect[key if r.route == "pooled" else (*key, normalize_text(r.text))] = float(r.effect)
        out = []
        for text, parse, edits in zip(texts, greedy, proposals):
            scored = [
                (eff, e)
                for e in edits
                if (eff := effect.get(e.key, effect.get((*e.key, normalize_text(text))))) is not None
            ]
            chosen = [e for _, e in sorted(scored, key=lambda x: -x[0])]
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
