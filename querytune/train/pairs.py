"""DPO pairs and GRPO's screened queries, from the rewards of each training query's candidate parses.

`build_pairs` pairs a query's worse candidates with better ones that the clicks can decide
(`querytune.train.pair_rules`); `anchor_pairs` pairs what the model already gets right against itself with a
"what"/"where" slot left out, and `anchor_targets` picks such queries for GRPO; `screen` keeps the queries whose
candidates earn different rewards. Pairs (pairs.parquet, `PAIR_COLUMNS`) and scored candidates
(`scored_candidates`) hold canonical JSON, so pair files and eval scripts read alike; `load_pairs` reads a
pair file back, checked.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from querytune.schema import ParseError, Schema
from querytune.train.pair_rules import CORE_FILTERS, _intent, adds_no_filter, keeps_written, tells_apart
from querytune.train.reward import INVALID, RetrievalReward, strict_parse
from querytune.train.targets import _valid, target_score

PAIR_COLUMNS = [
    "query",
    "user_city",
    "timestamp",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
    "rejected_is_greedy",
    "candidates",
    "rows",
    "contexts",
]


# -- DPO pairs -----------------------------------------------------------------------------------------
def reads_out_of_scope(schema: Schema, completion: str) -> bool:
    """Whether a completion is a valid parse whose intent takes no slots (out of scope: no search runs)."""
    try:
        parse = strict_parse(schema, completion)
    except ParseError:
        return False
    return schema.intents[parse.intent].slots == ()


def _searchable(targets: list[dict], candidates: list[list[str]], schema: Schema | None):
    """(target, candidates) of the queries whose greedy parse (the first candidate) runs a search. The init
    model's out-of-scope calls are left as they are: clicks on such queries are mostly accidental (in the
    world's log an out-of-scope query gets a click 12% of the time, others 60%), and preferring any search
    to none would teach that nothing is out of scope (an early GRPO run fell from 0.78 to 0.36 on them)."""
    for t, cands in zip(targets, candidates, strict=True):
        if schema is None or not (cands and reads_out_of_scope(schema, cands[0])):
            yield t, cands


def build_pairs(
    targets: list[dict],
    candidates: list[list[str]],
    reward: RetrievalReward,
    min_gap: float,
    per_query: int,
    schema: Schema | None = None,
) -> pd.DataFrame:
    """Score each query's distinct candidates (the first is the init model's greedy parse) and pair worse valid
    ones, the greedy parse first (the behaviour to fix) then the worst, each with the best scoring candidate
    that beats it by >= `min_gap` and finds something clicked (up to `per_query` pairs). Invalid candidates are counted,
    not paired: constrained decoding rules them out at inference, and pairing them would teach "say less" rather than
    "retrieve better". Both parses of a pair have the same intent: the intent is the labeled seed's job. Pairs
    across intents are few and shift whole classes: with samples of another intent as rejected ones (mostly
    sampling accidents, the query copied into a business name) a run read 81 of 85 out-of-scope and 72 of 137
    named-business test queries as find_business; with only 6 greedy parses of another intent rejected among
    143 pairs, 31 named-business test queries still became find_business; without them, 1 test query
    changed intent. With `schema`, queries whose greedy parse is out of scope are skipped (`_searchable`) and
    a pair must be one the clicks can decide (`tells_apart`) and its chosen parse may add no filter
    (`adds_no_filter`) nor drop a value the query writes (`keeps_written`)."""
    rows = []
    for t, cands in _searchable(targets, candidates, schema):
        scores = _scores(t, cands, reward)
        unique = list(scores)
        ranked = sorted(unique, key=lambda c: -scores[c])
        if len(ranked) < 2 or scores[ranked[0]] <= 0:
            continue
        greedy = cands[0]
        kept = 0
        for rejected in sorted((c for c in ranked if scores[c] >= 0), key=lambda c: (c != greedy, scores[c])):
            chosen = next(
                (
                    c
                    for c in ranked
                    if scores[c] - scores[rejected] >= min_gap
                    and _intent(c) == _intent(rejected)
                    and tells_apart(schema, c, rejected)
                    and adds_no_filter(schema, c, rejected)
                    and keeps_written(schema, t["query"], c, rejected)
                ),
                None,
            )
            if chosen is None:
                continue
            rows.append(
                {
                    "query": t["query"],
                    "user_city": t["user_city"],
                    "timestamp": t["timestamp"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_score": scores[chosen],
                    "rejected_score": scores[rejected],
                    "rejected_is_greedy": rejected == greedy,
                    "candidates": len(unique),
                    "rows": t.get("rows", 1),
                    "contexts": len(t.get("contexts") or [t]),
                }
            )
            kept += 1
            if kept == per_query:
                break
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def without_slot(completion: str, slot: str) -> str:
    """The completion with one slot left out, as canonical JSON (same order), the form candidates are held in.

    >>> without_slot('{"intent":"find_business","slots":{"category":"bar","city":"chicago"}}', "city")
    '{"intent":"find_business","slots":{"category":"bar"}}'
    """
    obj = json.loads(completion)
    obj["slots"] = {k: v for k, v in obj["slots"].items() if k != slot}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def dropped_slots(pairs: pd.DataFrame) -> Counter[str]:
    """How many pairs' chosen parse lacks a slot that the rejected one has (or sets it otherwise), per slot.

    >>> dropped_slots(pd.DataFrame({"chosen": ['{"intent":"i","slots":{"near_me":true}}'],
    ...                             "rejected": ['{"intent":"i","slots":{"city":"miami"}}']}))
    Counter({'city': 1})
    """
    out: Counter[str] = Counter()
    for chosen, rejected in zip(pairs["chosen"], pairs["rejected"]):
        a, b = json.loads(chosen)["slots"], json.loads(rejected)["slots"]
        out.update(k for k, v in b.items() if a.get(k) != v)
    return out


def anchor_pairs(
    targets: list[dict],
    candidates: list[list[str]],
    reward: RetrievalReward,
    min_gap: float,
    quotas: dict[str, int],
    keep_above: float = 0.5,
    schema: Schema | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Pairs that hold what the init model already gets right: for queries whose greedy parse (the first
    candidate) scores >= `keep_above`, the greedy parse against itself with one "what"/"where" slot left out
    (`without_slot`), where the clicks say that slot matters (the greedy parse wins by >= `min_gap`); at most
    `quotas[slot]` pairs leave out each slot (`limit` pairs in all), one pair per query, most typed queries first.

    Exploration pairs come from queries the model gets wrong, and DPO carries their lesson past them: pairs
    that replace a made-up city or neighbourhood by "near me" taught it to drop the city of "optometrist la"
    and the neighbourhood of "gyms in the loop" (on the world's rare-word texts: NDCG -0.017, slot recall
    0.91 -> 0.88). With quotas from `dropped_slots` of those pairs, each "drop the city here" comes with a
    "keep the city there", scored by the same reward on the same clicks. Measured, such DPO anchors overshoot
    (the model then adds slots and categories: 553 pairs, NDCG -0.019), so `train dpo` does not use them; GRPO
    does, through `anchor_targets`."""
    rows, left = [], Counter({k: n for k, n in quotas.items() if n > 0})
    searchable = [
        (t, c)
        for t, c in _searchable(targets, candidates, schema)
        if c and (_valid(schema, c[0]) if schema else _intent(c[0]))
    ]
    for t, cands in sorted(searchable, key=lambda tc: -tc[0].get("rows", 1)):
        if not +left or (limit is not None and len(rows) >= limit):
            break
        greedy = cands[0]
        core = [
            k
            for k in json.loads(greedy)["slots"]
            if left[k] > 0 and (schema is None or (k in schema.slots and schema.slots[k].filter in CORE_FILTERS))
        ]
        if not core or (top := target_score(reward, t, greedy)) < keep_above:
            continue
        worst, slot, rejected = min(
            (target_score(reward, t, r), k, r) for k, r in ((k, without_slot(greedy, k)) for k in core)
        )
        if top - worst >= min_gap:
            left[slot] -= 1
            rows.append(
                {
                    "query": t["query"],
                    "user_city": t["user_city"],
                    "timestamp": t["timestamp"],
                    "chosen": greedy,
                    "rejected": rejected,
                    "chosen_score": top,
                    "rejected_score": worst,
                    "rejected_is_greedy": False,
                    "candidates": len(core) + 1,
                    "rows": t.get("rows", 1),
                    "contexts": len(t.get("contexts") or [t]),
                }
            )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def anchor_targets(
    targets: list[dict],
    candidates: list[list[str]],
    reward: RetrievalReward,
    n: int,
    min_gap: float,
    schema: Schema,
    skip: set[str] = frozenset(),
) -> list[dict]:
    """Up to `n` targets (not in `skip`) that GRPO should keep answering as it does: the greedy parse scores
    well and leaving out one of its "what"/"where" slots costs >= `min_gap` (`anchor_pairs`), most typed first.
    Mixed into GRPO's queries, their groups are all equal while the policy keeps the slot, and punish the
    samples that drop it once it drifts: GRPO on improvable queries alone learnt to drop categories and to read
    find_business queries as business names (61 and 60 test queries; NDCG -0.011)."""
    core = {k: n for k, slot in schema.slots.items() if slot.filter in CORE_FILTERS}
    pool = [(t, c) for t, c in zip(targets, candidates, strict=True) if t["query"] not in skip]
    picked = set(
        anchor_pairs([t for t, _ in pool], [c[:1] for _, c in pool], reward, min_gap, core, schema=schema, limit=n)[
            "query"
        ]
    )
    return [t for t, _ in pool if t["query"] in picked]


# -- candidate rewards, GRPO's screening, pair files ---------------------------------------------------
def _scores(target: dict, candidates: list[str], reward: RetrievalReward) -> dict[str, float]:
    """Reward of each distinct non-empty candidate, in candidate order."""
    unique = dict.fromkeys(c for c in candidates if c)
    return {c: target_score(reward, target, c) for c in unique}


def scored_candidates(
    targets: list[dict], candidates: list[list[str]], reward: RetrievalReward, confidence: list[float] | None = None
) -> pd.DataFrame:
    """One row per distinct candidate parse of each query with its reward (`is_greedy`: the init model's own
    answer; `greedy_confidence`: the probability the model gives it): what the preference data was drawn from,
    to inspect next to the pairs."""
    confidence = confidence if confidence is not None else [None] * len(targets)
    rows = [
        {
            "query": t["query"],
            "user_city": t["user_city"],
            "candidate": c,
            "is_greedy": c == cands[0],
            "reward": r,
            "greedy_confidence": conf,
        }
        for t, cands, conf in zip(targets, candidates, confidence, strict=True)
        for c, r in _scores(t, cands, reward).items()
    ]
    return pd.DataFrame(rows, columns=["query", "user_city", "candidate", "is_greedy", "reward", "greedy_confidence"])


def screen(
    targets: list[dict],
    candidates: list[list[str]],
    reward: RetrievalReward,
    schema: Schema | None = None,
    improvable: bool = False,
) -> list[dict]:
    """The targets whose sampled parses earn different rewards. A group whose rewards are all equal gives GRPO
    no advantage to learn from (most groups, once the policy is decent): screening a larger pool with a few
    samples first spends the training steps on queries that carry a signal (DAPO's dynamic sampling, done
    once before training). `improvable`: keep only queries where some sample beats the (valid) greedy parse,
    the first candidate, in a way the clicks can decide (`tells_apart`, with `schema`): the signal is then
    "find more of what was clicked", not "avoid a sampling accident" or "chase a lucky click".
    With `schema`, queries whose greedy parse is out of scope are left out (`_searchable`)."""
    kept = []
    for t, cands in _searchable(targets, candidates, schema):
        scores = _scores(t, cands, reward)
        if len(set(scores.values())) < 2:
            continue
        best, greedy = max(scores, key=scores.get), scores.get(cands[0], INVALID)
        if not improvable or (scores[best] > greedy >= 0 and tells_apart(schema, best, cands[0])):
            kept.append(t)
    return kept


def edit_pairs(run: str | Path, version: str | None = None) -> pd.DataFrame:
    """DPO pairs from the click-evidence miner (`querytune train rft`'s OUT/labels.jsonl): each log text that accepted
    edits changed, its edited label (chosen) against the model's greedy parse (rejected), as canonical JSON. The scores
    are the miner's verdict (1 and 0), not rewards. `version`: the init model's, which must have parsed the texts."""
    run = Path(run)
    labels, greedy = run / "labels.jsonl", run / "greedy.jsonl"
    if not labels.is_file() or not greedy.is_file():
        raise FileNotFoundError(f"{run}: no labels.jsonl and greedy.jsonl here (a `querytune train rft` output folder)")
    if version is not None:
        first = json.loads(greedy.read_text(encoding="utf-8").splitlines()[0])
        if first.get("model_version") != version:
            raise ValueError(
                f"{greedy}: parsed by another model than --init (model version {version}); mine with the same init"
            )

    def as_json(p):
        return json.dumps({"intent": p["intent"], "slots": p["slots"]}, separators=(",", ":"), ensure_ascii=False)

    rows = []
    for line in labels.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["edits"]:
            rows.append(
                {
                    "query": r["text"],
                    "user_city": None,
                    "timestamp": None,
                    "chosen": as_json(r),
                    "rejected": as_json(r["greedy"]),
                    "chosen_score": 1.0,
                    "rejected_score": 0.0,
                    "rejected_is_greedy": True,
                    "candidates": 2,
                    "rows": 1,
                    "contexts": 0,
                }
            )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def load_pairs(path: str | Path) -> pd.DataFrame:
    """A pair file (Parquet), checked: every chosen completion must score strictly above its rejected one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pair file not found")
    pairs = pd.read_parquet(path)
    missing = {"query", "chosen", "rejected", "chosen_score", "rejected_score"} - set(pairs.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if pairs.empty:
        raise ValueError(f"{path}: no pairs")
    bad = pairs.index[~(pairs["chosen_score"] > pairs["rejected_score"])]
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{path}: row {i}: chosen_score {pairs.at[i, 'chosen_score']} is not above rejected_score "
            f"{pairs.at[i, 'rejected_score']} ({len(bad)} such rows): a pair needs a preference"
        )
    return pairs
