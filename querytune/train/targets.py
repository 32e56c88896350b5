"""Training queries from the click log, and the candidate parses explored for them.

Preference tuning learns from the earlier part of the click log, never from the labeled seed set: each training
query is a distinct query text with its position-debiased click evidence in up to 16 logged contexts
(`click_targets`), and a parse of it is scored in all of them (`target_score`). `sample_candidates` parses each
with the init model and, where the greedy parse looks wrong, explores its other parses (beams, rivals or
samples): what DPO's pairs and GRPO's screening are drawn from (`querytune.train.pairs`).

Candidates are held as canonical JSON whatever the model's format (`as_json`); `in_format` writes such a parse
back in the model's format where a trainer's dataset is built (`querytune.train.dpo`, `querytune.train.grpo`).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from querytune.labeled import seed_rows
from querytune.runtime import formats
from querytune.schema import WORD, ParseError, Schema, normalize_text
from querytune.train.clicks import MAX_CONTEXTS, contexts_by_text, estimate_propensity
from querytune.train.reward import RetrievalReward, score_in_contexts, strict_parse

EXPLORE_WITH = ("beam", "branch", "sample")  # how `sample_candidates` finds other parses of an explored query
PICKS = ("traffic", "random", "novel")  # how `click_targets` picks the logged texts to train on


# -- training queries from the click log ---------------------------------------------------------------
def click_targets(
    world: str | Path,
    n: int,
    seed: int = 0,
    exclude: set[str] | None = None,
    shuffle_clicks: bool = False,
    pick: str = "traffic",
    max_contexts: int = MAX_CONTEXTS,
) -> list[dict[str, Any]]:
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
    log, propensity, seed_texts = early_log(world, exclude)
    clicked = log[log["clicked"].map(lambda c: c is not None and len(c) > 0)]["key"]
    rows = log["key"].value_counts().to_dict()
    keys = sorted(set(clicked))
    rng = random.Random(seed)
    rng.shuffle(keys)
    if pick == "novel":
        keys = novel_first(keys, rows, seed_texts, n)
    else:
        keys = sorted(keys, key=lambda k: -rows[k])[:n] if pick == "traffic" else keys[:n]
    return _with_contexts(log, propensity, keys, rng, shuffle_clicks, max_contexts)


def early_log(world: str | Path, exclude: set[str] | None = None) -> tuple[pd.DataFrame, Any, list[str]]:
    """The early log's rows outside the seed set (or outside `exclude`, normalised texts), with a `key` column
    (the normalised text); the examination curve fitted on every early row; the seed's normalised texts."""
    world = Path(world)
    log = pd.read_parquet(world / "log.parquet")  # display_p may be missing (a v1 world): read as all 1.0
    log = log[log["period"] == "early"].reset_index(drop=True)
    propensity = estimate_propensity(log)  # from every early row: the randomisation, not the labels, is what it reads
    seed_texts = [normalize_text(r["text"]) for r in seed_rows(world)]
    exclude = exclude if exclude is not None else set(seed_texts)
    log["key"] = log["query"].map(normalize_text)
    return log[(log["key"] != "") & ~log["key"].isin(exclude)], propensity, seed_texts


def _with_contexts(
    log: pd.DataFrame, propensity, keys: list[str], rng: random.Random, shuffle_clicks: bool, max_contexts: int
) -> list[dict[str, Any]]:
    latest = (
        log.sort_values("timestamp", kind="stable").groupby("key").tail(1).set_index("key")["query"]
    )  # its latest spelling
    rows = log["key"].value_counts().to_dict()
    contexts = contexts_by_text(log[log["key"].isin(set(keys))], propensity, max_contexts)
    keys = [k for k in keys if k in contexts]
    ctx_lists = [contexts[k] for k in keys]
    if shuffle_clicks:
        rng.shuffle(ctx_lists)
    return [{"query": latest[k], "rows": int(rows[k]), "contexts": ctx} | ctx[0] for k, ctx in zip(keys, ctx_lists)]


def early_texts(world: str | Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct early-log texts outside the seed, drawn by rows (so by traffic), each as its first drawn row
    (`query_id`, `text`, `timestamp`, `user_city`): the log texts that self-training, RFT and the ceiling rows
    of eval/compare.py all add to the seed. Where the log holds an exploration bucket's rows (`world extend`), the
    texts the bucket explored (served with more than one candidate) come first, most explored first, every other
    one: the next round is there to learn from them, and a draw by rows would leave most of them out (they are the
    tail); the others are left out of this draw, for the miner's confirmation sample (`texts_with`), so an edit only
    the bucket can show is screened and confirmed on different texts."""
    world = Path(world)
    columns = pq.read_schema(world / "log.parquet").names
    wanted = ["query_id", "query", "period", "timestamp", "user_city"] + [
        c for c in ("policy", "candidates") if c in columns
    ]
    log = pd.read_parquet(world / "log.parquet", columns=wanted)
    seen = {normalize_text(r["text"]) for r in seed_rows(world)}
    early = log[log["period"] == "early"].sample(frac=1.0, random_state=seed)
    if "candidates" in early:
        explored = early["policy"].eq("explore") & early["candidates"].map(
            lambda c: isinstance(c, str) and len(json.loads(c)) > 1
        )
        key = early["query"].map(normalize_text)
        count = key[explored].value_counts()
        rank = key.map(count).fillna(0)
        early = early.assign(_rank=-rank, _key=key.where(rank > 0, "")).sort_values(["_rank", "_key"], kind="stable")
        order = sorted(count.index, key=lambda k: (-count[k], k))
        seen |= set(order[1::2])  # left for the confirmation sample
    out = []
    for r in early.itertuples():
        text = normalize_text(r.query)
        if not text or text in seen:
            continue
        seen.add(text)
        out.append(
            {"query_id": r.query_id, "text": r.query, "timestamp": r.timestamp.isoformat(), "user_city": r.user_city}
        )
        if len(out) >= n:
            break
    return out


def texts_with(world: str | Path, triggers: set[str], exclude: set[str], per_trigger: int) -> list[str]:
    """Up to `per_trigger` early-log texts with clicks (normalised) holding each trigger n-gram as whole words, the
    most typed first, none in `exclude` (normalised texts) nor in the seed: the confirmation sample of the
    evidence miner (`querytune.train.evidence`)."""
    log, _, seed_texts = early_log(world)
    log = log[~log["key"].isin(exclude)]
    clicked = log[log["clicked"].map(lambda c: c is not None and len(c) > 0)]
    rows = clicked["key"].value_counts()
    keys = sorted(rows.index, key=lambda k: (-rows[k], k))
    padded = [(f" {k} ", k) for k in keys]
    out: dict[str, None] = {}
    for trigger in sorted(triggers):
        out |= dict.fromkeys([k for p, k in padded if f" {trigger} " in p][:per_trigger])
    return list(out)


def text_targets(
    world: str | Path, texts: list[str], seed: int = 0, shuffle_clicks: bool = False, max_contexts: int = MAX_CONTEXTS
) -> dict[str, dict[str, Any]]:
    """Normalised text -> its target (as `click_targets` builds them) for those of `texts` with clicks in the
    early log; `shuffle_clicks` deals their contexts out at random among them (the placebo)."""
    log, propensity, _ = early_log(world, exclude=set())
    keys = sorted({normalize_text(t) for t in texts})
    targets = _with_contexts(
        log[log["key"].isin(set(keys))], propensity, keys, random.Random(seed), shuffle_clicks, max_contexts
    )
    return {normalize_text(t["query"]): t for t in targets}


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
        out += [q[depth] for q in queues if depth < len(q)][: n - len(out)]
        if len(out) >= n:
            break
    return out


def target_score(reward, target: dict[str, Any], completion: str) -> float:
    """A reward's score of one completion for a target, in all its contexts (`score_in_contexts`)."""
    return score_in_contexts(reward.score, target["query"], completion, target.get("contexts") or [target])


# -- candidate parses of the training queries ----------------------------------------------------------
def sample_candidates(
    init: Path,
    targets: list[dict],
    k: int,
    temperature: float,
    seed: int,
    say=print,
    reward: RetrievalReward | None = None,
    explore_below: float | None = None,
    explore_confidence: float | None = None,
    explore_with: str = "sample",
    constrained: bool = True,
) -> tuple[list[list[str]], list[float]]:
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
            why = [
                f"score below {explore_below}" if reward is not None and explore_below is not None else "",
                f"have confidence below {explore_confidence}" if explore_confidence is not None else "",
            ]
            say(
                f"{len(explore):,} of {len(texts):,} greedy parses {' and '.join(w for w in why if w)}: "
                f"exploring those ({explore_with})"
            )
        task = bar.add_task(f"{explore_with}: {k} per query", total=len(explore))
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        if not explore:
            sampled = []
        elif explore_with == "branch":
            sampled = parser.branch(
                [texts[i] for i in explore], positions=2, alternatives=max(1, k // 2), progress=advance
            )
        elif explore_with == "beam":
            sampled = parser.beams([texts[i] for i in explore], k, progress=advance)
        else:
            sampled = parser.sample(
                [texts[i] for i in explore], k, temperature=temperature, seed=seed, progress=advance
            )
    extra = dict(zip(explore, ([as_json(parser.schema, parser.format, r) for r in raws] for raws in sampled)))
    say(
        f"greedy parses of {len(texts):,} queries, {k} {explore_with} candidates of {len(explore):,}, "
        f"in {time.perf_counter() - t0:.0f}s"
    )
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


# -- the model's format and canonical JSON -------------------------------------------------------------
def as_json(schema: Schema, fmt: str, raw: str) -> str:
    """A completion the model wrote in format `fmt` as the canonical JSON that candidates and pairs hold; one that
    does not read stays as written, so it still scores INVALID (compact text never starts with "{").

    >>> from querytune.schema_file import load_schema
    >>> schema = load_schema()
    >>> as_json(schema, "compact", 'find_business near_me cuisine=thai'), as_json(schema, "compact", "thai?")
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

    >>> from querytune.schema_file import load_schema
    >>> in_format(load_schema(), "compact", '{"intent":"find_business","slots":{"neighborhood":"back bay"}}')
    'find_business neighborhood="back bay"'
    """
    if formats.WRITES[fmt] == "json":
        return parse_json
    try:
        return formats.completion(fmt, strict_parse(schema, parse_json))
    except ParseError:
        return parse_json
