"""DPO and GRPO plumbing on a tiny in-process model: training queries from the click log, pairs, the pair
file check, and a policy that moves after a step (LoRA weights and log-probabilities of sampled parses), in the
json format and the compact one (candidates and pairs held as JSON either way)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from querytune.cli import app
from querytune.runtime import formats
from querytune.runtime.generate import Parser
from querytune.runtime.model import ModelFolder
from querytune.schema import WORD, ParseError, normalize_text
from querytune.schema_file import load_schema
from querytune.train.dpo import DPORecipe, train_dpo
from querytune.train.grpo import GRPORecipe, train_grpo
from querytune.train.pairs import anchor_pairs, anchor_targets, build_pairs, dropped_slots, load_pairs, screen
from querytune.train.reward import strict_parse
from querytune.train.sft import train_sft
from querytune.train.targets import click_targets, sample_candidates
from tests.test_sft import ROWS, TINY

SCHEMA = load_schema()
LORA = {"lora_r": 4, "lora_alpha": 8, "warmup_steps": 0, "bf16": False, "max_minutes": None}


@pytest.fixture(scope="module")
def tiny_sft(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    train_sft(ROWS, SCHEMA, out, str(tiny_base), TINY | {"max_steps": 2}, say=lambda _: None, fmt="json")
    return out


@pytest.fixture(scope="module")
def tiny_compact(tiny_base, tmp_path_factory) -> Path:
    """`tiny_sft` in the compact format."""
    out = tmp_path_factory.mktemp("sft-compact")
    train_sft(ROWS, SCHEMA, out, str(tiny_base), TINY | {"max_steps": 2}, say=lambda _: None, fmt="compact")
    return out


def completion_logprob(model, tokenizer, prompt: str, completion: str) -> float:
    ids = tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False).input_ids
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float().log_softmax(-1)
    target = ids[0, 1:]
    return float(logits[n_prompt - 1 :].gather(1, target[n_prompt - 1 :, None]).sum())


def lora_b_moved(folder: Path) -> bool:
    weights = load_file(folder / "adapter_model.safetensors")
    return any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def test_click_targets_come_from_the_early_log_outside_the_seed(small_world):
    targets = click_targets(small_world, 50, seed=1)
    seed_texts = {
        normalize_text(json.loads(line)["text"]) for line in (small_world / "seed.jsonl").read_text().splitlines()
    }
    log = pd.read_parquet(small_world / "log.parquet")
    early = log[log["period"] == "early"].assign(norm=lambda d: d["query"].map(normalize_text))
    assert len(targets) == 50 and len({normalize_text(t["query"]) for t in targets}) == 50  # distinct texts
    assert all(
        normalize_text(t["query"]) in set(early["norm"]) and normalize_text(t["query"]) not in seed_texts
        for t in targets
    )
    for t in targets[:10]:  # up to 16 of its rows spread over the log, each with its city's debiased gains
        rows = early[early["norm"] == normalize_text(t["query"])]
        assert t["rows"] == len(rows)
        clicked_cities = {c for c, g in rows.groupby("user_city") if sum(len(k) for k in g["clicked"])}
        useful = rows[rows["user_city"].isin(clicked_cities)]
        assert len(t["contexts"]) == min(16, len(useful))
        assert [c["timestamp"] for c in t["contexts"]] == sorted(c["timestamp"] for c in t["contexts"])
        assert {(c["user_city"], c["timestamp"]) for c in t["contexts"]} <= {
            (u, ts.isoformat()) for u, ts in zip(useful["user_city"], useful["timestamp"])
        }
        for c in t["contexts"]:  # every business shown for the text in that city is judged; the clicked ones gain
            in_city = rows[rows["user_city"] == c["user_city"]]
            assert set(c["gains"]) == {b for s in in_city["shown"] for b in s}
            assert {b for b, g in c["gains"].items() if g > 0} == {b for k in in_city["clicked"] for b in k}
            assert all(0 <= g <= 1 for g in c["gains"].values())
        assert (t["user_city"], t["timestamp"], t["gains"]) == tuple(
            t["contexts"][0][k] for k in ("user_city", "timestamp", "gains")
        )
    # by traffic: the most typed texts, more typed first; at random: a sample that reaches into the tail
    assert [t["rows"] for t in targets] == sorted((t["rows"] for t in targets), reverse=True)
    assert min(t["rows"] for t in targets) >= max(t["rows"] for t in click_targets(small_world, 10_000, seed=1)[50:])
    sampled = click_targets(small_world, 50, seed=1, pick="random")
    assert sum(t["rows"] for t in sampled) < sum(t["rows"] for t in targets)
    with pytest.raises(ValueError, match="pick"):
        click_targets(small_world, 5, pick="head")
    # novel: every text holds a word that no seed text uses, and the words take turns
    known = {w for text in seed_texts for w in WORD.findall(text)}
    novel = click_targets(small_world, 50, seed=1, pick="novel")
    assert novel and all(set(WORD.findall(normalize_text(t["query"]))) - known for t in novel)
    assert len({frozenset(set(WORD.findall(normalize_text(t["query"]))) - known) for t in novel[:5]}) >= 3
    shuffled = click_targets(small_world, 50, seed=1, shuffle_clicks=True)
    assert [t["query"] for t in shuffled] == [t["query"] for t in targets]
    assert sorted(json.dumps(t["contexts"]) for t in shuffled) == sorted(json.dumps(t["contexts"]) for t in targets)
    assert sum(a["gains"] != b["gains"] for a, b in zip(targets, shuffled)) > 40


class ByLength:
    """Scores a completion by its length, less for spaces (the edge of a unit test: any reward with spread will do)."""

    __name__ = "by_length"
    calls = search_calls = 0

    def score(self, query, completion, user_city, timestamp, gains):
        return min(1.0, len(completion) / 100) - 0.05 * completion.count(" ")

    def __call__(self, prompts=None, completions=None, query=None, user_city=None, timestamp=None, gains=None, **_):
        return [self.score(q, c, u, t, g) for q, c, u, t, g in zip(query, completions, user_city, timestamp, gains)]


def test_pairs_fix_the_greedy_parse_and_skip_invalid_or_unclear_ones():
    targets = [{"query": "thai", "user_city": "austin", "timestamp": "2026-09-01T12:00:00", "gains": {"b": 1.0}}] * 3
    long_ = '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai","price":"cheap"}}'
    short = '{"intent":"find_business","slots":{}}'
    mid = '{"intent":"find_business","slots":{"category":"restaurant"}}'

    class Scores(ByLength):
        def score(self, query, completion, user_city, timestamp, gains):
            return {long_: 0.9, mid: 0.5, short: 0.1}.get(completion, -1.0)

    class ScoresWithNamed(Scores):
        def score(self, query, completion, user_city, timestamp, gains):
            return (
                0.0
                if "find_named_business" in completion
                else super().score(query, completion, user_city, timestamp, gains)
            )

    pairs = build_pairs(
        targets, [[mid, long_, short, "junk"], [short, short], [short, "junk"]], Scores(), min_gap=0.2, per_query=2
    )
    assert len(pairs) == 2  # query 2: one distinct candidate; query 3: the best finds nothing clicked
    assert (pairs["chosen"] == long_).all()
    assert pairs["rejected"].tolist() == [mid, short]  # the greedy parse (first) before the worst; "junk" never
    assert pairs["rejected_is_greedy"].tolist() == [True, False]
    named = '{"intent":"find_named_business","slots":{"business_name":"thai"}}'
    other_intent = build_pairs(targets[:1], [[long_, named, mid]], ScoresWithNamed(), min_gap=0.2, per_query=2)
    assert other_intent["rejected"].tolist() == [mid]  # a sampled parse of another intent is never a rejected one
    oos = '{"intent":"out_of_scope","slots":{}}'
    with_schema = build_pairs(
        targets[:2], [[mid, long_, short], [oos, long_, short]], Scores(), min_gap=0.2, per_query=2, schema=SCHEMA
    )
    # the query read as out of scope is left alone; the best parse adds a price filter the greedy one lacks, so it
    # is chosen over neither (a filter added by luck teaches adding filters): the greedy parse, better, is chosen
    assert with_schema[["chosen", "rejected"]].values.tolist() == [[mid, short]]
    no_price = '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai"}}'

    class WithNoPrice(Scores):
        def score(self, query, completion, user_city, timestamp, gains):
            return 0.8 if completion == no_price else super().score(query, completion, user_city, timestamp, gains)

    with_both = build_pairs(
        targets[:1], [[mid, long_, no_price]], WithNoPrice(), min_gap=0.2, per_query=2, schema=SCHEMA
    )
    assert with_both[["chosen", "rejected"]].values.tolist() == [[no_price, mid]]  # the best parse that adds no filter


def test_a_chosen_parse_never_drops_what_the_query_writes():
    target = {"query": "optometrist la", "user_city": "austin", "timestamp": "2026-09-01T12:00:00", "gains": {"b": 1.0}}
    la = '{"intent":"find_business","slots":{"category":"optometrist","city":"los angeles"}}'
    here = '{"intent":"find_business","slots":{"category":"optometrist","near_me":true}}'
    made_up = '{"intent":"find_business","slots":{"category":"optometrist","city":"miami"}}'

    class HereWins(ByLength):
        def score(self, query, completion, user_city, timestamp, gains):
            return {here: 0.9}.get(completion, 0.1)

    pairs = build_pairs(
        [target] * 2, [[la, here], [made_up, here]], HereWins(), min_gap=0.2, per_query=2, schema=SCHEMA
    )
    assert pairs[["chosen", "rejected"]].values.tolist() == [
        [here, made_up]
    ]  # "la" is written: never dropped for "near me"


def test_anchor_pairs_keep_the_slots_the_clicks_need_within_quotas():
    """Anchors pair a well-scored greedy parse against itself less one "what"/"where" slot, only where the clicks
    say the slot matters, within per-slot quotas taken from the exploration pairs (`dropped_slots`)."""
    full = '{"intent":"find_business","slots":{"category":"bar","city":"chicago","price":"cheap"}}'
    no_city = '{"intent":"find_business","slots":{"category":"bar","price":"cheap"}}'
    no_cat = '{"intent":"find_business","slots":{"city":"chicago","price":"cheap"}}'

    class CityMatters(ByLength):
        def score(self, query, completion, user_city, timestamp, gains):
            return {full: 0.8, no_city: 0.1, no_cat: 0.7}.get(completion, 0.0)

    targets = [
        {"query": q, "user_city": "austin", "timestamp": "2026-09-01T12:00:00", "gains": {"b": 1.0}, "rows": r}
        for q, r in (("bars chicago", 3), ("cheap bar chicago", 9), ("bar in chicago", 1))
    ]
    quotas = dropped_slots(pd.DataFrame({"chosen": [no_city, no_city], "rejected": [full, full]}))
    assert quotas == {"city": 2}
    anchors = anchor_pairs(targets, [[full], [full], [full]], CityMatters(), 0.3, quotas, schema=SCHEMA)
    assert anchors["query"].tolist() == ["cheap bar chicago", "bars chicago"]  # most typed first, two for the city
    assert (anchors["chosen"] == full).all() and (anchors["rejected"] == no_city).all()
    assert anchor_pairs(
        targets, [[full]] * 3, CityMatters(), 0.3, {"category": 5}, schema=SCHEMA
    ).empty  # 0.1 apart: not needed
    assert anchor_pairs(
        targets, [[no_city]] * 3, CityMatters(), 0.3, {"category": 5}, schema=SCHEMA
    ).empty  # greedy scores < 0.5
    picked = anchor_targets(targets, [[full]] * 3, CityMatters(), 1, 0.3, SCHEMA, skip={"cheap bar chicago"})
    assert [t["query"] for t in picked] == ["bars chicago"]


def test_screening_keeps_queries_whose_parses_earn_different_rewards():
    a, b = '{"intent":"find_business","slots":{}}', '{"intent":"find_business","slots":{"category":"bar"}}'
    targets = [
        {"query": q, "user_city": "austin", "timestamp": "2026-09-01T12:00:00", "gains": {"b": 1.0}} for q in "wxyz"
    ]
    kept = screen(targets, [[a, a, a], [a, b], ["", a], [b, "junk"]], ByLength())
    assert [t["query"] for t in kept] == ["x", "z"]  # w: one parse; y: an empty sample is no candidate
    improvable = screen(targets, [[a, a, a], [a, b], ["", a], [b, "junk"]], ByLength(), improvable=True)
    assert [t["query"] for t in improvable] == ["x"]  # z: its greedy parse beats the sample
    oos = '{"intent":"out_of_scope","slots":{}}'
    assert [t["query"] for t in screen(targets[:2], [[a, b], [oos, b]], ByLength(), schema=SCHEMA)] == ["w"]


def test_sampling_explores_only_the_queries_whose_greedy_parse_misses(tiny_sft, small_world):
    targets = click_targets(small_world, 4, seed=0)

    class MissesFirst:  # the first query's greedy parse finds nothing clicked; the others find everything
        def score(self, query, completion, user_city, timestamp, gains):
            return 0.0 if query == targets[0]["query"] else 1.0

    candidates, confidence = sample_candidates(
        tiny_sft, targets, 3, 1.0, seed=0, say=lambda _: None, reward=MissesFirst(), explore_below=0.5
    )
    assert [len(c) for c in candidates] == [
        4,
        1,
        1,
        1,
    ]  # greedy + 3 samples for the miss, the greedy parse alone elsewhere
    assert len(confidence) == 4 and all(0 < c <= 1 for c in confidence)
    everything, same = sample_candidates(tiny_sft, targets[:2], 2, 1.0, seed=0, say=lambda _: None)
    assert [len(c) for c in everything] == [3, 3] and everything[1][0] == candidates[1][
        0
    ]  # same greedy parse either way
    assert [math.log(c) for c in same] == pytest.approx(
        [math.log(c) for c in confidence[:2]], abs=0.1
    )  # bf16, other batches
    # the model's confidence picks the queries on its own, and together with the reward both must hold
    middle = math.sqrt(sorted(confidence)[1] * sorted(confidence)[2])  # between the 2nd and 3rd most confident
    unsure, _ = sample_candidates(tiny_sft, targets, 2, 1.0, seed=0, say=lambda _: None, explore_confidence=middle)
    assert [len(c) for c in unsure] == [3 if c < middle else 1 for c in confidence]
    both, _ = sample_candidates(
        tiny_sft,
        targets,
        2,
        1.0,
        seed=0,
        say=lambda _: None,
        reward=MissesFirst(),
        explore_below=0.5,
        explore_confidence=middle,
    )
    assert [len(c) for c in both] == [3 if i == 0 and confidence[0] < middle else 1 for i in range(4)]


def test_branching_forks_the_greedy_completion_where_the_model_hesitates(tiny_sft, small_world):
    parser = Parser(tiny_sft)
    texts = [t["query"] for t in click_targets(small_world, 3, seed=0)]
    greedy = [g[0] for g in parser.sample(texts, 1, temperature=0)]
    rivals = parser.branch(texts, positions=2, alternatives=2)
    assert [len(r) for r in rivals] == [4, 4, 4]  # 2 least likely tokens x their 2 runners-up
    tok = parser.tokenizer
    for g, rs in zip(greedy, rivals):
        g_ids = tok(g, add_special_tokens=False).input_ids
        for r in rs:
            assert r != g  # each rival replaces a greedy token...
            r_ids = tok(r, add_special_tokens=False).input_ids
            fork = next((i for i, (a, b) in enumerate(zip(g_ids, r_ids)) if a != b), min(len(g_ids), len(r_ids)))
            assert r_ids[:fork] == g_ids[:fork]  # ...after the greedy prefix, which it keeps
    for how in ("branch", "beam"):  # the greedy parse + 4 others (constrained to the schema by default)
        candidates, _ = sample_candidates(
            tiny_sft, [{"query": t} for t in texts], 4, 1.0, seed=0, say=lambda _: None, explore_with=how
        )
        assert [len(c) for c in candidates] == [5, 5, 5], how
    beams = Parser(tiny_sft).beams(texts, 3)
    assert [len(b) for b in beams] == [3, 3, 3]  # the 3 best sequences of each
    with pytest.raises(ValueError, match="explore_with"):
        sample_candidates(
            tiny_sft, [{"query": t} for t in texts], 4, 1.0, seed=0, say=lambda _: None, explore_with="greedy"
        )


def test_a_pair_file_with_equal_scores_is_rejected(tmp_path):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(
        [{"query": "q", "chosen": "a", "rejected": "b", "chosen_score": 0.5, "rejected_score": 0.5}]
    ).to_parquet(path)
    with pytest.raises(ValueError, match=r"row 0: chosen_score 0.5 is not above rejected_score 0.5"):
        load_pairs(path)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "dpo",
            "--init",
            "x",
            "--world",
            "w",
            "--index",
            "i",
            "--out",
            str(tmp_path / "o"),
            "--pairs",
            str(path),
        ],
    )
    assert result.exit_code == 2 and "not a querytune model folder" in result.output
    result = CliRunner().invoke(
        app,
        [
            "train",
            "grpo",
            "--init",
            "x",
            "--world",
            "w",
            "--index",
            "i",
            "--out",
            str(tmp_path / "o"),
            "--explore-with",
            "greedy",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2 and "'greedy' is not one of 'beam', 'branch', 'sample'" in result.output
    (tmp_path / "c.yaml").write_text("pick: head\n")  # a config file's choices are checked as the command line's are
    result = CliRunner().invoke(
        app,
        [
            "train",
            "dpo",
            "--init",
            "x",
            "--world",
            "w",
            "--index",
            "i",
            "--out",
            str(tmp_path / "o"),
            "--config",
            str(tmp_path / "c.yaml"),
        ],
    )
    assert result.exit_code == 2 and "--pick: 'head' is not one of traffic, random, novel" in result.output
    result = CliRunner().invoke(
        app,
        [
            "train",
            "grpo",
            "--init",
            "x",
            "--world",
            "w",
            "--index",
            "i",
            "--out",
            str(tmp_path / "o"),
            "--screen-k",
            "0",
            "--anchors",
            "1",
        ],
    )
    assert result.exit_code == 2 and "--anchors: anchor queries are picked while screening" in result.output


def thai_pairs() -> tuple[str, str, pd.DataFrame]:
    """One DPO pair eight times: a thai restaurant search chosen over out of scope, as JSON (as pair files hold it)."""
    chosen = '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai"}}'
    rejected = '{"intent":"out_of_scope","slots":{}}'
    return (
        chosen,
        rejected,
        pd.DataFrame(
            [
                {
                    "query": "cheap thai near me",
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_score": 0.9,
                    "rejected_score": 0.0,
                }
            ]
            * 8
        ),
    )


def test_dpo_step_moves_the_policy_towards_the_chosen(tiny_sft, tmp_path):
    parser = Parser(tiny_sft)
    chosen, rejected, pairs = thai_pairs()
    prompt = parser.prompts(["cheap thai near me"])[0]
    before = completion_logprob(parser.model, parser.tokenizer, prompt, chosen) - completion_logprob(
        parser.model, parser.tokenizer, prompt, rejected
    )
    out = tmp_path / "dpo"
    summary = train_dpo(
        pairs,
        tiny_sft,
        out,
        DPORecipe() | LORA | {"max_steps": 3, "epochs": 1.0, "batch_size": 4, "lr": 5e-3, "beta": 0.1},
        say=lambda _: None,
    )
    assert summary["steps"] == 3 and lora_b_moved(out)
    meta = ModelFolder.open(out).meta
    assert meta["stage"] == "dpo" and meta["init_model_version"] == ModelFolder.open(tiny_sft).version
    assert ModelFolder.open(out).adapters == [out]  # the init's adapter and the new one, combined
    tuned = ModelFolder.open(out).merged()
    after = completion_logprob(tuned, parser.tokenizer, prompt, chosen) - completion_logprob(
        tuned, parser.tokenizer, prompt, rejected
    )
    assert after > before
    logged = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert {"margin", "logp_chosen", "logp_rejected"} <= set(logged[-1])
    Parser(out).parse(["cheap thai"])  # the tuned folder loads and parses like any model folder


def test_grpo_step_changes_lora_and_sampled_logprobs(tiny_sft, small_world, tmp_path):
    targets = click_targets(small_world, 8, seed=0)
    parser = Parser(tiny_sft)
    samples = parser.sample([t["query"] for t in targets[:2]], k=2, seed=0)
    prompts = parser.prompts([t["query"] for t in targets[:2]])
    before = [completion_logprob(parser.model, parser.tokenizer, p, s) for p, ss in zip(prompts, samples) for s in ss]
    out = tmp_path / "grpo"
    summary = train_grpo(
        targets,
        ByLength(),
        tiny_sft,
        out,
        GRPORecipe()
        | LORA
        | {"max_steps": 2, "batch_size": 4, "num_generations": 4, "temperature": 1.0, "lr": 5e-3, "beta": 0.04},
        say=lambda _: None,
    )
    assert summary["steps"] == 2 and lora_b_moved(out)
    tuned = ModelFolder.open(out).merged()
    after = [completion_logprob(tuned, parser.tokenizer, p, s) for p, ss in zip(prompts, samples) for s in ss]
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-4
    logged = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert {"reward", "reward_std", "no_signal", "completion_len"} <= set(logged[-1])


def test_dpo_and_grpo_train_with_the_step_levers(tiny_sft, small_world, tmp_path):
    """The presets' levers (bf16 weight storage, the head only at scored positions, merged-adapter sampling under
    autocast) run through TRL's real trainers, move the adapter and log where a GRPO step's time goes."""
    levers = LORA | {"bf16": True, "lr": 5e-3}  # the recipes' defaults are their levers
    _, _, pairs = thai_pairs()
    summary = train_dpo(
        pairs,
        tiny_sft,
        tmp_path / "dpo",
        DPORecipe() | levers | {"max_steps": 2, "epochs": 1.0, "batch_size": 4, "beta": 0.1},
        say=lambda _: None,
    )
    assert summary["steps"] == 2 and lora_b_moved(tmp_path / "dpo")
    summary = train_grpo(
        click_targets(small_world, 8, seed=0),
        ByLength(),
        tiny_sft,
        tmp_path / "grpo",
        GRPORecipe()
        | levers
        | {"max_steps": 2, "batch_size": 4, "num_generations": 4, "temperature": 1.0, "beta": 0.04},
        say=lambda _: None,
    )
    assert summary["steps"] == 2 and lora_b_moved(tmp_path / "grpo")
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "steps.jsonl").read_text().splitlines()]
    assert all(row["sampling_s"] > 0 for row in logged)
    Parser(tmp_path / "grpo").parse(["cheap thai"])


def test_candidates_of_a_compact_model_are_held_as_json(tiny_compact, small_world):
    """The parser writes compact completions; the candidates that pairs, audits and candidates.parquet hold are their
    canonical JSON twins, and a completion that does not read stays as written (it scores INVALID either way)."""
    targets = click_targets(small_world, 4, seed=0)
    candidates, _ = sample_candidates(tiny_compact, targets, 2, 1.0, seed=0, say=lambda _: None)
    held_as_json = 0
    for c in (c for cands in candidates for c in cands):
        try:
            parse = strict_parse(SCHEMA, c)
        except ParseError:  # kept as written: then it does not read as compact either
            with pytest.raises(ParseError):
                formats.read("compact", SCHEMA, c)
            continue
        assert c == parse.to_json()
        held_as_json += 1
    assert held_as_json >= 1  # greedy parses are decoded inside the compact grammar: they read


def test_dpo_on_a_compact_model_trains_the_compact_twins_of_its_json_pairs(tiny_compact, tmp_path):
    parser = Parser(tiny_compact)
    chosen, rejected, pairs = thai_pairs()
    prompt = parser.prompts(["cheap thai near me"])[0]
    assert prompt == "cheap thai near me\n"  # the compact prompt, no chat template
    assert formats.completion("compact", SCHEMA.parse(chosen)) == "find_business category=restaurant cuisine=thai"

    def margin(model, fmt: str) -> float:
        c, r = (formats.completion(fmt, SCHEMA.parse(x)) for x in (chosen, rejected))
        return completion_logprob(model, parser.tokenizer, prompt, c) - completion_logprob(
            model, parser.tokenizer, prompt, r
        )

    before = {fmt: margin(parser.model, fmt) for fmt in formats.FORMATS}
    out = tmp_path / "dpo"
    summary = train_dpo(
        pairs,
        tiny_compact,
        out,
        DPORecipe() | LORA | {"max_steps": 3, "epochs": 1.0, "batch_size": 4, "lr": 5e-3, "beta": 0.1},
        say=lambda _: None,
    )
    assert summary["steps"] == 3 and lora_b_moved(out)
    tuned = ModelFolder.open(out).merged()
    gain = {fmt: margin(tuned, fmt) - before[fmt] for fmt in formats.FORMATS}
    assert gain["compact"] > max(
        0.0, gain["json"]
    )  # the pair was learnt as the model writes it (trained as JSON: +1.0 against +3.2)
    assert (
        ModelFolder.open(out).meta["format"] == "compact" and Parser(out).format == "compact"
    )  # the tuned folder keeps its init's format


class Recorder(ByLength):
    """ByLength that keeps what TRL hands the reward besides the completions: each row's prompt, query and format."""

    def __init__(self):
        self.seen = []

    def __call__(self, prompts=None, completions=None, query=None, fmt=None, **columns):
        self.seen += zip(prompts, query, fmt)
        return super().__call__(prompts, completions, query, **columns)


def test_grpo_on_a_compact_model_samples_from_compact_prompts_and_tells_the_reward(tiny_compact, small_world, tmp_path):
    targets = click_targets(small_world, 8, seed=0)
    reward, out = Recorder(), tmp_path / "grpo"
    summary = train_grpo(
        targets,
        reward,
        tiny_compact,
        out,
        GRPORecipe()
        | LORA
        | {"max_steps": 2, "batch_size": 4, "num_generations": 4, "temperature": 1.0, "lr": 5e-3, "beta": 0.04},
        say=lambda _: None,
    )
    assert summary["steps"] == 2 and lora_b_moved(out)
    assert len(reward.seen) == 8 and all(p == q + "\n" and f == "compact" for p, q, f in reward.seen)
    assert ModelFolder.open(out).meta["format"] == "compact" and Parser(out).format == "compact"


@pytest.mark.slow
@pytest.mark.parametrize("init", ["tiny_sft", "tiny_compact"])
def test_dpo_and_grpo_train_through_the_cli(init, request, small_world, real_index, tmp_path):
    """The commands end to end on the small world and a real index, from a json and a compact model: DPO from a pair
    file, GRPO with the retrieval reward online, and GRPO screening that finds no query with a signal (a random
    model's parses are all equally bad) stopping with a message instead of training on nothing."""
    import yaml

    init = request.getfixturevalue(init)
    tiny = {"lora_r": 4, "lora_alpha": 8, "bf16": False, "max_minutes": 0}
    common = ["--init", str(init), "--world", str(small_world), "--index", str(real_index)]
    pairs = tmp_path / "pairs.parquet"
    pd.DataFrame(
        [
            {
                "query": "cheap thai near me",
                "chosen": '{"intent":"find_business","slots":{"cuisine":"thai"}}',
                "rejected": '{"intent":"out_of_scope","slots":{}}',
                "chosen_score": 0.9,
                "rejected_score": 0.0,
            }
        ]
        * 4
    ).to_parquet(pairs)
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(tiny | {"max_steps": 1, "batch_size": 2}))
    result = CliRunner().invoke(
        app,
        [
            "train",
            "dpo",
            *common,
            "--out",
            str(tmp_path / "dpo"),
            "--pairs",
            str(pairs),
            "--config",
            str(tmp_path / "dpo.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["steps"] == 1
    fmt = ModelFolder.open(init).meta["format"]
    (tmp_path / "grpo.yaml").write_text(
        yaml.safe_dump(tiny | {"queries": 8, "screen_k": 0, "max_steps": 1, "batch_size": 4, "num_generations": 4})
    )
    result = CliRunner().invoke(
        app, ["train", "grpo", *common, "--out", str(tmp_path / "grpo"), "--config", str(tmp_path / "grpo.yaml")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["screened_queries"] is None and summary["searches"] >= 0
    assert len((tmp_path / "grpo" / "targets.jsonl").read_text().splitlines()) == 8  # what a `--resume` trains on again
    assert [ModelFolder.open(tmp_path / s).meta["format"] for s in ("dpo", "grpo")] == [fmt, fmt]
    result = CliRunner().invoke(
        app,
        [
            "train",
            "grpo",
            *common,
            "--out",
            str(tmp_path / "grpo2"),
            "--config",
            str(tmp_path / "grpo.yaml"),
            "--screen-k",
            "2",
        ],
    )
    if result.exit_code == 2:
        assert "nothing for GRPO to learn" in result.output
    else:
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / "grpo2" / "summary.json").read_text())
        assert summary["screened_queries"] == 8 and 0 < summary["queries_with_signal"] <= 8


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_a_killed_preference_run_resumes_from_its_last_checkpoint(stage, tiny_sft, small_world, tmp_path, monkeypatch):
    """Checkpoints every 2 steps, a kill after step 3 of 4, then `resume=True`: steps 3-4 follow the kept log."""
    from trl import DPOTrainer, GRPOTrainer

    trainer_cls = DPOTrainer if stage == "dpo" else GRPOTrainer
    out = tmp_path / stage
    preset = LORA | {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "beta": 0.1, "save_steps": 2}
    if stage == "dpo":
        pairs = pd.DataFrame(
            [
                {
                    "query": "cheap thai near me",
                    "chosen": '{"intent":"find_business","slots":{"cuisine":"thai"}}',
                    "rejected": '{"intent":"out_of_scope","slots":{}}',
                    "chosen_score": 0.9,
                    "rejected_score": 0.0,
                }
            ]
            * 16
        )

        def train(resume):
            return train_dpo(pairs, tiny_sft, out, DPORecipe() | preset, say=lambda _: None, resume=resume)
    else:
        targets = click_targets(small_world, 8, seed=0)
        preset |= {"num_generations": 4, "temperature": 1.0}

        def train(resume):
            return train_grpo(
                targets, ByLength(), tiny_sft, out, GRPORecipe() | preset, say=lambda _: None, resume=resume
            )

    real_step = trainer_cls.training_step

    def killed_after_step_3(self, *a, **kw):
        if self.state.global_step >= 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(trainer_cls, "training_step", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(False)
    before = (out / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2, 3]
    monkeypatch.setattr(trainer_cls, "training_step", real_step)
    summary = train(True)
    after = (out / "steps.jsonl").read_text().splitlines()
    assert (
        summary["steps"] == 4
        and [json.loads(line)["step"] for line in after] == [1, 2, 3, 4]
        and after[:2] == before[:2]
    )
    assert lora_b_moved(out) and not (out / "checkpoints").exists()
