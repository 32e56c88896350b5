"""Preference tuning on retrieval success: DPO on scored samples, and GRPO with the reward online.

Both start from a tuned model folder (SFT), merge its adapters into the base, and train a new LoRA on
top, so the adapter-free model is the SFT policy and serves as the reference (KL anchor) of both losses.
Training queries come from the earlier part of the click log, never from the labeled seed set: each is a
distinct query text with its position-debiased click evidence in up to 16 logged contexts (`click_targets`).

The model reads and writes its init folder's format (`querytune.runtime.formats`), and the tuned folder keeps it. Candidates,
pairs (pairs.parquet) and audits hold canonical JSON whatever the format, so pair files and eval scripts read alike:
a completion becomes JSON where the parser returns it (`as_json`) and goes back to the model's format where a
trainer's dataset is built (`in_format`); GRPO's reward reads the policy's own completions in its format.

    querytune train dpo  --init runs/sft --world runs/world --index runs/index --out runs/dpo
    querytune train grpo --init runs/sft --world runs/world --index runs/index --out runs/grpo

Both save checkpoints in out/checkpoints (`querytune.train.sft.checkpoint_args`) and continue a stopped run with `--resume`.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from querytune.runtime import formats
from querytune.runtime.model import BASE_KEYS, MAX_NEW_TOKENS, copy_adapter_chain, load_model_meta
from querytune.schema import WORD, ParseError, Schema, normalize_text
from querytune.train.clicks import MAX_CONTEXTS, contexts_by_text, estimate_propensity
from querytune.train.reward import INVALID, RetrievalReward, score_in_contexts, strict_parse
from querytune.train.sft import LORA_TARGETS, StepLog, checkpoint_args, finish_checkpoints, report_args, start_or_resume

DPO_PRESETS: dict[str, dict[str, Any]] = {
    # quick: <= 15 minutes on 2 CPU cores: the constrained greedy parse of the 2,000 most typed texts of the early log
    # (~4 min in bf16), each scored in every city it was typed in; for those whose parse both misses the clicks (< 0.5)
    # and is one the model doubts (confidence < 0.35), its 4 nearest rivals (`Parser.branch`, ~2 min); pairs the
    # clicks can decide; two passes at a gentle lr (~3 min). Measured from the world seed-0 SFT: see docs/loop.md.
    # Tried and left out (docs/loop.md): 8 beams per doubted query (more pairs, 152 from 84 texts, 97 of them right against the
    # hidden needs) at lr 2e-4 fell by 0.030 (the chosen beams added filters by luck; slot precision 0.91 -> 0.82);
    # without filter-adding chosen parses (`adds_no_filter`) still -0.025 at lr 2e-4.
    "quick": {"queries": 2000, "pick": "traffic", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": True,
              "k": 4, "temperature": 1.0, "loss_type": "sigmoid", "sft_weight": 0.5, "min_gap": 0.3, "pairs_per_query": 2, "epochs": 2.0,
              "max_steps": -1, "batch_size": 8, "lr": 1e-4, "beta": 0.1, "lora_r": 16, "lora_alpha": 32, "warmup_steps": 5, "bf16": True,
              "max_minutes": 5.0, "save_steps": 50},
    "full": {"queries": 8000, "pick": "traffic", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": True,
             "k": 8, "temperature": 1.0,
             "loss_type": "sigmoid", "sft_weight": 0.5, "min_gap": 0.3, "pairs_per_query": 2, "epochs": 2.0, "max_steps": -1,
             "batch_size": 16, "lr": 1e-4, "beta": 0.1, "lora_r": 16, "lora_alpha": 32, "warmup_steps": 10, "bf16": True, "max_minutes": None,
             "save_steps": 50},
}
GRPO_PRESETS: dict[str, dict[str, Any]] = {
    # quick: <= 20 minutes on 2 CPU cores. Screening (~6 min): the greedy parse of 1,500 logged texts, the 4 rivals of
    # those it both misses and doubts; training only on texts where a rival beats the greedy parse in a way the clicks can decide (`screen`,
    # improvable), each mixed with an anchor query (`anchor_targets`, anchors 1.0). Then 4 of them x 8 samples per step
    # (~21 s/step: sampling dominates). Measured: see docs/loop.md. Without anchors the same run fell by 0.011 (categories
    # dropped, 60 test queries read as business names); with them +0.001 [-0.007, +0.009].
    # Screening keeps stop 12's random texts and free decoding (-0.000 [-0.007, +0.007] then): with the 1,500 most typed
    # texts and constrained screening, 46 texts were improvable and GRPO fell by 0.025 (slot recall 0.91 -> 0.85).
    # lr 2e-4 on 11 queries screened without the confidence filter fell to -0.016; lr 5e-4 with each sampled batch
    # used for 2 steps to -0.140 (slot recall 0.74).
    "quick": {"queries": 1500, "pick": "random", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": False,
              "screen_k": 4, "improvable": True, "anchors": 1.0, "min_gap": 0.3, "max_steps": 45, "num_iterations": 1, "num_generations": 8,
              "batch_size": 32, "temperature": 0.8,
              "lr": 1e-4, "beta": 0.04, "lora_r": 16, "lora_alpha": 32, "warmup_steps": 5, "bf16": True, "max_minutes": 11.0,
              "save_steps": 10},  # a GRPO step samples 256 parses (~21 s on CPU): a checkpoint every ~4 min
    "full": {"queries": 8000, "pick": "traffic", "explore_below": 0.5, "explore_confidence": 0.35, "explore_with": "branch", "constrained": True,
             "screen_k": 4, "improvable": True,
             "anchors": 1.0, "min_gap": 0.3, "max_steps": 600, "num_iterations": 1, "num_generations": 8, "batch_size": 64, "temperature": 0.8, "lr": 1e-4, "beta": 0.04,
             "lora_r": 16, "lora_alpha": 32, "warmup_steps": 10, "bf16": True, "max_minutes": None, "save_steps": 10},
}
EXPLORE_WITH = ("beam", "branch", "sample")  # how `sample_candidates` finds other parses of an explored query
PICKS = ("traffic", "random", "novel")  # how `click_targets` picks the logged texts to train on
NO_SIGNAL_WARN = 0.6  # GRPO: warn when this share of groups, averaged over the last 10 steps, has all-equal rewards


# -- training queries from the click log ---------------------------------------------------------------
def click_targets(world: str | Path, n: int, seed: int = 0, exclude: set[str] | None = None,
                  shuffle_clicks: bool = False, pick: str = "traffic", max_contexts: int = MAX_CONTEXTS) -> list[dict[str, Any]]:
    """`n` distinct query texts (normalised) from the early log that have clicks. Each target holds the text
    (`query`, its latest spelling), `rows` (how often it was typed) and `contexts`: up to `max_contexts` of its
    logged rows spread over the log, each `{user_city, timestamp, gains}` with the position-debiased gains of
    the businesses shown for the text in that city (`querytune.train.clicks.contexts_by_text`; the examination curve
    is estimated from the early log's randomised impressions); `user_city`, `timestamp` and `gains` repeat the
    first context. A parse is scored in every context (`score_in_contexts`): the model's parse of a text does
    not depend on who typed it.

    `pick`: "traffic" takes the most typed texts (ties in seeded random order): where a parse's errors cost most
    users, and where many users' clicks make the reward reliable (on the world's log, the 2,000 most typed texts
    carry 49% of the early traffic and a random 2,000 about 5%); "random": a uniform sample of texts; "novel": texts
    with words the seed set never shows (`novel_first`), where imitation has nothing to copy.
    `exclude`: normalised texts to leave out (the labeled seed set). `shuffle_clicks`: a control; each text gets
    another's contexts (its cities, times and gains)."""
    if pick not in PICKS:
        raise ValueError(f"pick: {pick!r} is not one of {', '.join(PICKS)}")
    world = Path(world)
    log = pd.read_parquet(world / "log.parquet")  # display_p may be missing (a v1 world): read as all 1.0
    log = log[log["period"] == "early"].reset_index(drop=True)
    propensity = estimate_propensity(log)  # from every early row: the randomisation, not the labels, is what it reads
    seed_texts = [normalize_text(json.loads(line)["text"]) for line in (world / "seed.jsonl").read_text().splitlines() if line.strip()]
    exclude = exclude if exclude is not None else set(seed_texts)
    log["key"] = log["query"].map(normalize_text)
    log = log[(log["key"] != "") & ~log["key"].isin(exclude)]
    clicked = log[log["clicked"].map(lambda c: c is not None and len(c) > 0)]["key"]
    latest = log.sort_values("timestamp", kind="stable").groupby("key").tail(1).set_index("key")["query"]  # its latest spelling
    rows = log["key"].value_counts().to_dict()
    keys = sorted(set(clicked))
    rng = random.Random(seed)
    rng.shuffle(keys)
    if pick == "novel":
        keys = novel_first(keys, rows, seed_texts, n)
    else:
        keys = sorted(keys, key=lambda k: -rows[k])[:n] if pick == "traffic" else keys[:n]
    contexts = contexts_by_text(log[log["key"].isin(set(keys))], propensity, max_contexts)
    ctx_lists = [contexts[k] for k in keys]
    if shuffle_clicks:
        rng.shuffle(ctx_lists)
    return [{"query": latest[k], "rows": int(rows[k]), "contexts": ctx} | ctx[0] for k, ctx in zip(keys, ctx_lists)]


def novel_first(keys: list[str], rows: dict[str, int], seed_texts: list[str], n: int, min_rows: int = 5) -> list[str]:
    """Up to `n` of `keys` (normalised texts, in a seeded order) that hold a word the seed texts never use, spread
    over those words: a novel word is one typed in at least `min_rows` rows (a word, not a one-off typo); words
    take turns, most typed first, each giving its most typed text not yet taken. SFT has no label to imitate for
    these words, and a pair that fixes "chemist" or "atx" in one text carries over to other phrasings of it (on
    the world's test set, 18% of the queries hold such a word and 37% of SFT's distance from the oracle parse).

    >>> novel_first(["chemist open now", "dentist", "chemist near me", "atx plumber"],
    ...             {"chemist open now": 9, "dentist": 50, "chemist near me": 3, "atx plumber": 6},
    ...             ["dentist near me", "plumber open now"], 3, min_rows=1)
    ['chemist open now', 'atx plumber', 'chemist near me']"""
    known = {w for text in seed_texts for w in WORD.findall(text)}
    typed: Counter[str] = Counter()
    for k in keys:
        typed.update(dict.fromkeys(WORD.findall(k), rows[k]))
    by_word: dict[str, list[str]] = defaultdict(list)
    for k in sorted(keys, key=lambda k: -rows[k]):
        novel = [w for w in set(WORD.findall(k)) if w not in known and typed[w] >= min_rows]
        if novel:
            by_word[max(novel, key=lambda w: (typed[w], w))].append(k)
    queues = [by_word[w] for w in sorted(by_word, key=lambda w: (-typed[w], w))]
    out: list[str] = []
    for depth in range(max(map(len, queues), default=0)):
        out += [q[depth] for q in queues if depth < len(q)][:n - len(out)]
        if len(out) >= n:
            break
    return out


def target_score(reward, target: dict[str, Any], completion: str) -> float:
    """A reward's score of one completion for a target, in all its contexts (`score_in_contexts`)."""
    return score_in_contexts(reward.score, target["query"], completion, target.get("contexts") or [target])


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


def _intent(completion: str) -> str | None:
    try:
        return json.loads(completion).get("intent")
    except (json.JSONDecodeError, AttributeError):
        return None


CORE_FILTERS = ("what", "city", "neighborhood", "near_me")  # slots that choose which businesses are candidates at all
PAIR_COLUMNS = ["query", "user_city", "timestamp", "chosen", "rejected", "chosen_score", "rejected_score", "rejected_is_greedy",
                "candidates", "rows", "contexts"]


def pair_kind(schema: Schema, chosen: str, rejected: str) -> str:
    """How two parses of one query differ: "intent"; "chosen only drops" (the chosen parse's slots are a strict
    subset of the rejected one's); "what/where" (they differ in a slot that chooses the candidates,
    `CORE_FILTERS`); or "filters only" (rating, price, attributes).

    >>> from querytune.schema import load_schema
    >>> s, thai = load_schema(), '{"intent":"find_business","slots":{"cuisine":"thai"}}'
    >>> pair_kind(s, thai, '{"intent":"find_business","slots":{"category":"bar"}}')
    'what/where'
    >>> pair_kind(s, '{"intent":"find_business","slots":{}}', thai)
    'chosen only drops'
    >>> pair_kind(s, '{"intent":"find_business","slots":{"cuisine":"thai","min_rating":4.5}}', thai)
    'filters only'
    """
    a, b = json.loads(chosen), json.loads(rejected)
    if a["intent"] != b["intent"]:
        return "intent"
    sa, sb = a["slots"], b["slots"]
    if set(sa.items()) < set(sb.items()):
        return "chosen only drops"
    differ = {k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k)}
    return "what/where" if any(k in schema.slots and schema.slots[k].filter in CORE_FILTERS for k in differ) else "filters only"


def tells_apart(schema: Schema | None, chosen: str, rejected: str) -> bool:
    """Whether a single query's clicks can tell these two parses apart (`pair_kind`): they differ in the intent
    or in a slot that chooses the candidates (the "what" and the "where"), and the chosen one does not merely
    say less. Audited against the world's hidden needs (220 pairs from 1,500 logged queries,
    `eval/pair_audit.py`), the pairs this rule removes had the chosen parse closer to the truth 38 times and
    farther 31 times: mostly one lucky click on a business that happens to lack a filter or a slot. The pairs
    it keeps: 94 closer, 21 farther. Without a schema every pair is kept."""
    return schema is None or pair_kind(schema, chosen, rejected) in ("intent", "what/where")


def adds_no_filter(schema: Schema | None, chosen: str, rejected: str) -> bool:
    """Whether the chosen parse holds no filter (a slot outside the "what" and "where", `CORE_FILTERS`: rating,
    price, hours, attributes) that the rejected one lacks or sets otherwise. Among beams, the best scoring parse
    often adds a filter by luck (a few clicked places happen to have outdoor seating): of 45 filter values such
    chosen parses added on the world's log, 34 were not in the user's need, and DPO on them learnt to add filters
    to test queries (slot precision 0.91 -> 0.82). Without a schema every pair passes.

    >>> from querytune.schema import load_schema
    >>> s, bar = load_schema(), '{"intent":"find_business","slots":{"category":"bar"}}'
    >>> adds_no_filter(s, '{"intent":"find_business","slots":{"category":"cafe"}}', bar)
    True
    >>> adds_no_filter(s, '{"intent":"find_business","slots":{"category":"cafe","outdoor_seating":true}}', bar)
    False
    """
    if schema is None:
        return True
    a, b = json.loads(chosen)["slots"], json.loads(rejected)["slots"]
    return all(b.get(k) == v for k, v in a.items() if k in schema.slots and schema.slots[k].filter not in CORE_FILTERS)


def keeps_written(schema: Schema | None, text: str, chosen: str, rejected: str) -> bool:
    """Whether the chosen parse keeps every value of the rejected one that the query writes (`Slot.written_in`:
    the value or an alias, up to typos), or replaces it with another written value. The click log cannot
    always tell "la" read as Los Angeles from a search where the user is: its ranker searched the user's city,
    and a popular text such as "bakery in wicker park" is typed by users in every city, who click what they
    were shown there. A pair that drops what the query says teaches the model to drop cities and
    neighbourhoods everywhere (on the world's rare-word texts: city dropped from 26 test queries, slot recall
    0.91 -> 0.88). Made-up values (a neighbourhood the query never names) may still be dropped. Without a
    schema every pair passes.

    >>> from querytune.schema import load_schema
    >>> s = load_schema()
    >>> la = '{"intent":"find_business","slots":{"category":"optometrist","city":"los angeles"}}'
    >>> here = '{"intent":"find_business","slots":{"category":"optometrist","near_me":true}}'
    >>> keeps_written(s, "optometrist la", here, la), keeps_written(s, "optometrist near me", here, la)
    (False, True)
    """
    if schema is None:
        return True
    a, b = json.loads(chosen)["slots"], json.loads(rejected)["slots"]
    for k, v in b.items():
        slot = schema.slots.get(k)
        if slot is None or a.get(k) == v or isinstance(v, bool) or not slot.written_in(v, text):
            continue
        if k not in a or not slot.written_in(a[k], text):
            return False
    return True


def build_pairs(targets: list[dict], candidates: list[list[str]], reward: RetrievalReward, min_gap: float,
                per_query: int, schema: Schema | None = None) -> pd.DataFrame:
    """Score each query's distinct candidates (the first is the init model's greedy parse) and pair worse valid
    ones, the greedy parse first (the behaviour to fix) then the worst, each with the best scoring candidate
    that beats it by >= `min_gap` and finds something clicked (up to `per_query` pairs). Invalid candidates are counted, not paired:
    constrained decoding rules them out at inference, and pairing them would teach "say less" rather than
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
            chosen = next((c for c in ranked if scores[c] - scores[rejected] >= min_gap and _intent(c) == _intent(rejected)
                           and tells_apart(schema, c, rejected) and adds_no_filter(schema, c, rejected)
                           and keeps_written(schema, t["query"], c, rejected)), None)
            if chosen is None:
                continue
            rows.append({"query": t["query"], "user_city": t["user_city"], "timestamp": t["timestamp"],
                         "chosen": chosen, "rejected": rejected, "chosen_score": scores[chosen], "rejected_score": scores[rejected],
                         "rejected_is_greedy": rejected == greedy, "candidates": len(unique), "rows": t.get("rows", 1),
                         "contexts": len(t.get("contexts") or [t])})
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


def anchor_pairs(targets: list[dict], candidates: list[list[str]], reward: RetrievalReward, min_gap: float,
                 quotas: dict[str, int], keep_above: float = 0.5, schema: Schema | None = None,
                 limit: int | None = None) -> pd.DataFrame:
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
    searchable = [(t, c) for t, c in _searchable(targets, candidates, schema) if c and (_valid(schema, c[0]) if schema else _intent(c[0]))]
    for t, cands in sorted(searchable, key=lambda tc: -tc[0].get("rows", 1)):
        if not +left or (limit is not None and len(rows) >= limit):
            break
        greedy = cands[0]
        core = [k for k in json.loads(greedy)["slots"] if left[k] > 0 and (schema is None or (k in schema.slots and schema.slots[k].filter in CORE_FILTERS))]
        if not core or (top := target_score(reward, t, greedy)) < keep_above:
            continue
        worst, slot, rejected = min((target_score(reward, t, r), k, r) for k, r in ((k, without_slot(greedy, k)) for k in core))
        if top - worst >= min_gap:
            left[slot] -= 1
            rows.append({"query": t["query"], "user_city": t["user_city"], "timestamp": t["timestamp"], "chosen": greedy,
                         "rejected": rejected, "chosen_score": top, "rejected_score": worst, "rejected_is_greedy": False,
                         "candidates": len(core) + 1, "rows": t.get("rows", 1), "contexts": len(t.get("contexts") or [t])})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def anchor_targets(targets: list[dict], candidates: list[list[str]], reward: RetrievalReward, n: int, min_gap: float,
                   schema: Schema, skip: set[str] = frozenset()) -> list[dict]:
    """Up to `n` targets (not in `skip`) that GRPO should keep answering as it does: the greedy parse scores
    well and leaving out one of its "what"/"where" slots costs >= `min_gap` (`anchor_pairs`), most typed first.
    Mixed into GRPO's queries, their groups are all equal while the policy keeps the slot, and punish the
    samples that drop it once it drifts: GRPO on improvable queries alone learnt to drop categories and to read
    find_business queries as business names (61 and 60 test queries; NDCG -0.011)."""
    core = {k: n for k, slot in schema.slots.items() if slot.filter in CORE_FILTERS}
    pool = [(t, c) for t, c in zip(targets, candidates, strict=True) if t["query"] not in skip]
    picked = set(anchor_pairs([t for t, _ in pool], [c[:1] for _, c in pool], reward, min_gap, core, schema=schema, limit=n)["query"])
    return [t for t, _ in pool if t["query"] in picked]


def _scores(target: dict, candidates: list[str], reward: RetrievalReward) -> dict[str, float]:
    """Reward of each distinct non-empty candidate, in candidate order."""
    unique = dict.fromkeys(c for c in candidates if c)
    return {c: target_score(reward, target, c) for c in unique}


def scored_candidates(targets: list[dict], candidates: list[list[str]], reward: RetrievalReward,
                      confidence: list[float] | None = None) -> pd.DataFrame:
    """One row per distinct candidate parse of each query with its reward (`is_greedy`: the init model's own
    answer; `greedy_confidence`: the probability the model gives it): what the preference data was drawn from,
    to inspect next to the pairs."""
    confidence = confidence if confidence is not None else [None] * len(targets)
    rows = [{"query": t["query"], "user_city": t["user_city"], "candidate": c, "is_greedy": c == cands[0], "reward": r,
             "greedy_confidence": conf}
            for t, cands, conf in zip(targets, candidates, confidence, strict=True) for c, r in _scores(t, cands, reward).items()]
    return pd.DataFrame(rows, columns=["query", "user_city", "candidate", "is_greedy", "reward", "greedy_confidence"])


def screen(targets: list[dict], candidates: list[list[str]], reward: RetrievalReward, schema: Schema | None = None,
           improvable: bool = False) -> list[dict]:
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
        raise ValueError(f"{path}: row {i}: chosen_score {pairs.at[i, 'chosen_score']} is not above rejected_score "
                         f"{pairs.at[i, 'rejected_score']} ({len(bad)} such rows): a pair needs a preference")
    return pairs


# -- shared set-up -------------------------------------------------------------------------------------
def _policy(init: Path, preset: dict[str, Any]):
    """Tokenizer, the init folder's merged model, a fresh LoRA config for it, its meta and schema."""
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from querytune.runtime.model import load_merged

    meta, schema = load_model_meta(init)
    tokenizer = AutoTokenizer.from_pretrained(init)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_merged(init, torch.float32)
    lora = LoraConfig(r=preset["lora_r"], lora_alpha=preset["lora_alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=[m for m in LORA_TARGETS if any(n.endswith(m) for n, _ in model.named_modules())] or "all-linear")
    return tokenizer, model, lora, meta, schema


def as_json(schema: Schema, fmt: str, raw: str) -> str:
    """A completion the model wrote in format `fmt` as the canonical JSON that candidates and pairs hold; one that
    does not read stays as written, so it still scores INVALID (compact text never starts with "{").

    >>> from querytune.schema import load_schema
    >>> as_json(load_schema(), "compact", 'find_business near_me cuisine=thai'), as_json(load_schema(), "compact", "thai?")
    ('{"intent":"find_business","slots":{"cuisine":"thai","near_me":true}}', 'thai?')
    """
    if formats.WRITES[fmt] == "json":
        return raw  # as the model wrote it, as before formats had names
    try:
        return formats.completion("json", formats.read(fmt, schema, raw))
    except ParseError:
        return raw


def in_format(schema: Schema, fmt: str, parse_json: str) -> str:
    """A parse held as JSON (a pair's chosen or rejected) as the model writes it in format `fmt`, for a trainer's
    dataset; one that does not read stays as it is.

    >>> from querytune.schema import load_schema
    >>> in_format(load_schema(), "compact", '{"intent":"find_business","slots":{"neighborhood":"back bay"}}')
    'find_business neighborhood="back bay"'
    """
    if formats.WRITES[fmt] == "json":
        return parse_json
    try:
        return formats.completion(fmt, strict_parse(schema, parse_json))
    except ParseError:
        return parse_json


def _save(trainer, tokenizer, init: Path, out: Path, schema: Schema, meta: dict, stage: str) -> None:
    from querytune.runtime.model import save_model_meta

    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    chain = copy_adapter_chain(init, out)
    save_model_meta(out, schema, {"stage": stage, **{k: meta[k] for k in BASE_KEYS if k in meta}, "format": formats.folder_format(meta),
                                  "adapter": True, "init_adapters": chain, "init": str(init), "max_new_tokens": meta.get("max_new_tokens", MAX_NEW_TOKENS)})


def _train_and_save(trainer, tokenizer, init: Path, out: Path, schema: Schema, meta: dict, stage: str, resume_from: str | None = None):
    """Train (StepLog prints instead of the default printer; from checkpoint `resume_from`), save the folder; the
    result, seconds and step log."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    finish_checkpoints(out, trainer)
    _save(trainer, tokenizer, init, out, schema, meta, stage)
    return result, seconds, [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


# -- DPO -----------------------------------------------------------------------------------------------
def sample_candidates(init: Path, targets: list[dict], k: int, temperature: float, seed: int, say=print,
                      reward: RetrievalReward | None = None, explore_below: float | None = None,
                      explore_confidence: float | None = None, explore_with: str = "sample",
                      constrained: bool = True) -> tuple[list[list[str]], list[float]]:
    """The init model's greedy parse plus `k` other parses per query (bf16 decoding: the policy as it is), and
    the confidence of each greedy parse (the probability the model gives it).

    Only queries where the greedy parse looks wrong are sampled (the others keep their greedy parse alone):
    - with `reward` and `explore_below`: its search scores below `explore_below` against the clicks;
    - with `explore_confidence`: the model gives it a probability below `explore_confidence`.
    A greedy parse that misses the clicks is most often right and the clicks noise (a quarter of the world's
    clicks land on a business that does not meet the need, and one click rarely lands in a search's top 10):
    against the world's hidden needs, 78% of such greedy parses had the true "what" and "where". The model's own
    confidence tells its errors apart far better (test ROC AUC 0.92 for a wrong "what"/"where"; the 17% of greedy
    parses below 0.35 hold 69% of those errors); of those that both miss and are doubted, 47% are right, so the
    two together spend the exploring, and the pairs, on the parses worth fixing.

    `explore_with`: "beam" takes the model's `k` most likely parses (`Parser.beams`); "branch" the greedy parse's
    rivals at its 2 least likely tokens, `k // 2` each (`Parser.branch`): the alternatives the model itself
    hesitated over, each differing from the greedy parse in one decision; "sample" draws `k` samples
    (temperature `temperature`). Beams most often hold the right parse (see `Parser.beams`).

    Candidates come back as canonical JSON whatever the model's format (`as_json`).

    `constrained` (default): greedy parses and rivals are decoded inside the schema's grammar, as `eval parse`,
    `predict` and serving decode: the parse to fix is the one users get. Free decoding writes values outside the
    schema ("lawn_care", a neighbourhood called "joint") for 10% of the world's 2,000 most typed texts; such a
    parse cannot be a rejected one (`build_pairs`), and it is not what the served model answers."""
    if explore_with not in EXPLORE_WITH:
        raise ValueError(f"explore_with: {explore_with!r} is not one of {', '.join(EXPLORE_WITH)}")
    from rich.progress import Progress

    from querytune.runtime.generate import Parser

    parser = Parser(init, batch_size=48, constrained=constrained)
    texts = [t["query"] for t in targets]
    t0 = time.perf_counter()
    with Progress(*Progress.get_default_columns()) as bar:
        task = bar.add_task("greedy parses", total=len(texts))
        greedy, confidence = _greedy(parser, texts, progress=lambda n: bar.advance(task, n))
        explore = list(range(len(texts)))
        if explore_confidence is not None:
            explore = [i for i in explore if confidence[i] < explore_confidence]
        if reward is not None and explore_below is not None:
            explore = [i for i in explore if target_score(reward, targets[i], greedy[i]) < explore_below]
        if len(explore) < len(texts):
            why = [f"score below {explore_below}" if reward is not None and explore_below is not None else "",
                   f"have confidence below {explore_confidence}" if explore_confidence is not None else ""]
            say(f"{len(explore):,} of {len(texts):,} greedy parses {' and '.join(w for w in why if w)}: exploring those ({explore_with})")
        task = bar.add_task(f"{explore_with}: {k} per query", total=len(explore))
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        if not explore:
            sampled = []
        elif explore_with == "branch":
            sampled = parser.branch([texts[i] for i in explore], positions=2, alternatives=max(1, k // 2), progress=advance)
        elif explore_with == "beam":
            sampled = parser.beams([texts[i] for i in explore], k, progress=advance)
        else:
            sampled = parser.sample([texts[i] for i in explore], k, temperature=temperature, seed=seed, progress=advance)
    extra = dict(zip(explore, ([as_json(parser.schema, parser.format, r) for r in raws] for raws in sampled)))
    say(f"greedy parses of {len(texts):,} queries, {k} {explore_with} candidates of {len(explore):,}, in {time.perf_counter() - t0:.0f}s")
    return [[g, *extra.get(i, [])] for i, g in enumerate(greedy)], confidence


def _greedy(parser, texts: list[str], progress=None) -> tuple[list[str], list[float]]:
    """Greedy completions (bf16; as JSON, `as_json`) and their probabilities. A constrained parser decodes freely
    first and again, constrained, only the outputs that leave the schema: where the free greedy output is valid,
    every token of it was allowed, so constrained decoding would write the same (and free decoding is ~1.5x faster)."""
    import math

    out = [g[0] for g in parser.sample(texts, 1, temperature=0, logprobs=True, progress=progress, constrained=False)]
    if parser.constrained:
        redo = [i for i, (text, _) in enumerate(out) if not _valid(parser.schema, text, parser.format)]
        for i, g in zip(redo, parser.sample([texts[i] for i in redo], 1, temperature=0, logprobs=True) if redo else []):
            out[i] = g[0]
    return [as_json(parser.schema, parser.format, g) for g, _ in out], [math.exp(lp) for _, lp in out]


def _valid(schema: Schema, completion: str, fmt: str = "json") -> bool:
    try:
        strict_parse(schema, completion, fmt=fmt)
        return True
    except ParseError:
        return False


def train_dpo(pairs: pd.DataFrame, init: Path, out: Path, preset: dict[str, Any], seed: int = 0, say=print,
              resume: bool = False, report_to: str = "none") -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(seed)
    tokenizer, model, lora, meta, schema = _policy(init, preset)
    fmt = formats.folder_format(meta)
    data = Dataset.from_list([{"prompt": formats.prompt(fmt, schema, tokenizer, q), "chosen": in_format(schema, fmt, c),
                               "rejected": in_format(schema, fmt, r)} for q, c, r in zip(pairs["query"], pairs["chosen"], pairs["rejected"])])
    longest = max(len(tokenizer(p + max(c, r, key=len)).input_ids) for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"]))
    last = start_or_resume(out, resume, say)
    log = StepLog(out / "steps.jsonl", say, preset.get("max_minutes"),
                  extra={"margin": "rewards/margins", "accuracy": "rewards/accuracies", "logp_chosen": "logps/chosen",
                         "logp_rejected": "logps/rejected"})
    args = DPOConfig(
        **checkpoint_args(out, preset), max_steps=preset["max_steps"], num_train_epochs=preset["epochs"],
        per_device_train_batch_size=preset["batch_size"], learning_rate=preset["lr"], lr_scheduler_type="cosine",
        warmup_steps=preset["warmup_steps"], beta=preset["beta"], max_length=longest + 2, logging_steps=1,
        # DPO plus a likelihood term on the chosen parse (RPO): keeps the chosen parses likely, not only relatively
        loss_type=[preset.get("loss_type", "sigmoid"), "sft"] if preset.get("sft_weight") else [preset.get("loss_type", "sigmoid")],
        loss_weights=[1.0, preset["sft_weight"]] if preset.get("sft_weight") else None,
        **report_args(out, report_to), seed=seed, use_cpu=not torch.cuda.is_available(), bf16=preset.get("bf16", False),
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                         callbacks=[log.callback])
    result, seconds, steps = _train_and_save(trainer, tokenizer, init, out, schema, meta, "dpo", last)
    return {"stage": "dpo", "init": str(init), "pairs": len(pairs), "steps": result.global_step, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, result.global_step), 2), "final_loss": steps[-1]["loss"] if steps else None,
            "margin_start": steps[0].get("margin") if steps else None, "margin_end": steps[-1].get("margin") if steps else None}


# -- GRPO ----------------------------------------------------------------------------------------------
def train_grpo(targets: list[dict], reward: RetrievalReward, init: Path, out: Path, preset: dict[str, Any], seed: int = 0,
               say=print, resume: bool = False, report_to: str = "none") -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(seed)
    tokenizer, model, lora, meta, schema = _policy(init, preset)
    fmt = formats.folder_format(meta)  # the policy writes its completions in it; the `fmt` column tells the reward
    data = Dataset.from_list([{"prompt": formats.prompt(fmt, schema, tokenizer, t["query"]), "query": t["query"], "user_city": t["user_city"],
                               "timestamp": t["timestamp"], "gains": json.dumps(t["gains"]),
                               "contexts": json.dumps(t.get("contexts") or [t]), "fmt": fmt} for t in targets])
    last = start_or_resume(out, resume, say)
    recent: list[float] = []
    warned: list[int] = []

    def watch(row: dict) -> str | None:
        if "no_signal" not in row:
            return None
        recent.append(row["no_signal"])
        window = recent[-10:]
        if len(recent) >= 10 and sum(window) / len(window) > NO_SIGNAL_WARN and not warned:
            warned.append(row["step"])
            return (f"warning: {sum(window) / len(window):.0%} of groups over the last 10 steps had equal rewards (no learning "
                    f"signal): raise --temperature or --num-generations, or start from a weaker model")
        return None

    log = StepLog(out / "steps.jsonl", say, preset.get("max_minutes"),
                  extra={"reward": "reward", "reward_std": "reward_std", "no_signal": "frac_reward_zero_std", "kl": "kl",
                         "completion_len": "completions/mean_length"}, watch=watch)
    args = GRPOConfig(
        **checkpoint_args(out, preset), max_steps=preset["max_steps"], per_device_train_batch_size=preset["batch_size"],
        num_generations=preset["num_generations"], max_completion_length=int(meta.get("max_new_tokens", MAX_NEW_TOKENS)),
        # each batch of sampled groups serves `num_iterations` optimizer steps (clipped ratio, as in PPO): sampling
        # dominates a step on CPU, so reusing it learns more per minute
        num_iterations=int(preset.get("num_iterations", 1)),
        temperature=preset["temperature"], top_k=0, top_p=1.0, learning_rate=preset["lr"], lr_scheduler_type="constant_with_warmup",
        warmup_steps=preset["warmup_steps"], beta=preset["beta"], logging_steps=1, **report_args(out, report_to), seed=seed,
        use_cpu=not torch.cuda.is_available(), bf16=preset.get("bf16", False), disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=bool(preset.get("use_vllm", False)), vllm_mode="colocate",
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=lora, callbacks=[log.callback])
    result, seconds, steps = _train_and_save(trainer, tokenizer, init, out, schema, meta, "grpo", last)
    head, tail = steps[: max(1, len(steps) // 10)], steps[-max(1, len(steps) // 10):]
    mean = lambda rows, k: round(sum(r.get(k, 0.0) for r in rows) / len(rows), 4)  # noqa: E731
    return {"stage": "grpo", "init": str(init), "queries": len(targets), "steps": result.global_step,
            "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(1, result.global_step), 2),
            "reward_start": mean(head, "reward"), "reward_end": mean(tail, "reward"),
            "no_signal_start": mean(head, "no_signal"), "no_signal_end": mean(tail, "no_signal"),
            "kl_end": mean(tail, "kl"), "no_signal_warning_at_step": warned[0] if warned else None,
            "reward_calls": reward.calls, "searches": reward.search_calls}
