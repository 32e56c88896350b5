"""The click-evidence miner on a hand-built log: a planted edit is accepted, a planted null is not, an unsupported
text stays unknown, a vetoed table is what relabels; and `train rft` (and self-training) end to end on the
tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from querytune.cli import app
from querytune.schema_file import load_schema
from querytune.train.evidence import EditMiner
from querytune.train.rft import PRESETS, RFTRecipe, load_edit_table

SCHEMA = load_schema()
PIZZA_TEXTS = [
    "pizza near me",
    "pizza in soho",
    "late pizza",
    "best pizza",
    "pizza delivery spots",
    "pizza downtown",
    "cheap pizza",
    "pizza by the slice",
    "family pizza",
    "pizza open now",
]
CHEAP_TEXTS = [
    "cheap thai",
    "cheap tacos near me",
    "cheap sushi",
    "cheap ramen",
    "cheap bbq",
    "cheap pho",
    "cheap burgers",
    "cheap korean",
]


class Shelf:
    """A stand-in search: cuisine pizza finds the pizzerias first (p1, p2), any other parse the Italian places
    (i1, i2) first; a price filter changes the order of the cheap texts' list by a coin flip per (parse, city)."""

    catalog, embedder, k = None, None, 10

    def __init__(self):
        self.rng = random.Random(0)
        self.calls = 0

    def ranked(self, parse, user_city, timestamp):
        self.calls += 1
        if "pizza" in str(parse.slots.get("cuisine")) or parse.slots.get("cuisine") == "italian":
            return ["p1", "p2", "i1", "i2"] if parse.slots.get("cuisine") == "pizza" else ["i1", "i2", "p1", "p2"]
        pair = ["t1", "t2"] if random.Random(f"{parse.to_json()}|{user_city}").random() < 0.5 else ["t2", "t1"]
        return pair + ["t3"]


class Reward:
    def __init__(self):
        self.searcher, self.k, self.search_calls = Shelf(), 10, 0

    def ranked(self, parse, user_city, timestamp):
        return self.searcher.ranked(parse, user_city, timestamp)


def ctx(city: str, gains: dict) -> dict:
    return {"user_city": city, "timestamp": "2026-09-01T12:00:00", "gains": gains}


def hand_built():
    """Greedy parses as a guideline-taught model writes them (pizza read as italian, cheap as the cheapest tier), and
    clicks: pizzerias clicked in every city; for the cheap texts t1 or t2 clicked by a coin flip (no evidence)."""
    texts = PIZZA_TEXTS + CHEAP_TEXTS + ["pizza in a town nobody logged"]
    greedy = [
        {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "italian"}} for _ in PIZZA_TEXTS
    ]
    greedy += [
        {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": t.split()[1], "price": "cheap"}}
        for t in CHEAP_TEXTS
    ]
    greedy += [{"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "italian"}}]
    coin = random.Random(1)
    targets = {
        t: {"query": t, "contexts": [ctx(c, {"p1": 0.9, "p2": 0.5, "i1": 0.0}) for c in ("austin", "boston", "miami")]}
        for t in PIZZA_TEXTS
    }
    targets |= {
        t: {
            "query": t,
            "contexts": [
                ctx(c, {"t1": 1.0, "t2": 0.0} if coin.random() < 0.5 else {"t1": 0.0, "t2": 1.0})
                for c in ("austin", "boston", "miami", "denver")
            ],
        }
        for t in CHEAP_TEXTS
    }
    # a text whose logged lists share no business with either parse's results: nothing can judge it
    targets["pizza in a town nobody logged"] = {
        "query": "pizza in a town nobody logged",
        "contexts": [ctx("austin", {"z9": 1.0})],
    }
    return texts, greedy, targets


def test_the_miner_accepts_a_planted_edit_and_rejects_a_planted_null():
    texts, greedy, targets = hand_built()
    miner = EditMiner(SCHEMA, Reward(), seed_rows=[])
    table, proposals = miner.mine(texts, greedy, targets)
    pizza = table[(table["trigger"] == "pizza") & (table["new"] == '"pizza"')]
    assert len(pizza) == 1 and bool(pizza["accepted"].iloc[0]) and pizza["route"].iloc[0] == "pooled"
    assert pizza["texts"].iloc[0] == len(PIZZA_TEXTS) and pizza["effect"].iloc[0] > 0.3 and pizza["low"].iloc[0] > 0
    swaps = table[table["slot"] == "price"]
    assert len(swaps) > 0 and not swaps["accepted"].any()  # coin-flip clicks: every price swap tested, none accepted
    assert swaps["q"].notna().all() and (swaps["q"] > 0.05).all()
    relabeled = miner.apply(texts, greedy, proposals, table)
    assert all(p["slots"]["cuisine"] == "pizza" for p, _ in relabeled[: len(PIZZA_TEXTS)])
    assert all(p["slots"]["price"] == "cheap" for p, _ in relabeled[len(PIZZA_TEXTS) : -1])
    # pooled evidence carries to the text no context could judge: it holds the trigger, so it is relabeled too
    assert relabeled[-1][0]["slots"]["cuisine"] == "pizza" and [e.trigger for e in relabeled[-1][1]] == ["pizza"]


def test_the_single_text_route_is_off_unless_asked_for():
    """With too few texts for a pooled test (min_texts 99), the pizza edit has only the single-text route: three
    supported contexts, each a large gain. Off by default; text_contexts=3 accepts it for each text alone."""
    texts, greedy, targets = hand_built()
    for text_contexts, accepted in ((0, 0), (3, len(PIZZA_TEXTS))):
        table, _ = EditMiner(SCHEMA, Reward(), seed_rows=[], min_texts=99, text_contexts=text_contexts).mine(
            texts, greedy, targets
        )
        single = table[table["accepted"] & (table["route"] == "text")]
        assert len(single) == accepted and set(single["new"]) <= {'"pizza"'}
        assert not table.loc[table["route"] == "pooled", "accepted"].any()


def test_a_screened_edit_is_judged_on_the_confirmation_texts_alone():
    """Two stages: the training texts screen (uncorrected p), other log texts confirm; the same screened edit is
    accepted where the confirmation texts' clicks agree and rejected where they favour the greedy parse."""
    texts, greedy, targets = hand_built()
    miner = EditMiner(SCHEMA, Reward(), seed_rows=[])
    proposals = miner.propose(texts, greedy)
    found = miner.evidence(texts, greedy, proposals, targets)
    screened = miner.screened(found)
    assert ("what", "pizza", "cuisine", '"italian"', '"pizza"') in screened
    others = [f"pizza spot {i}" for i in range(6)]
    parses = [{"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "italian"}}] * len(others)
    kept = [[e for e in edits if e.key in screened] for edits in miner.propose(others, parses)]
    for gains, accepted in (({"p1": 0.9, "i1": 0.0}, True), ({"i1": 0.9, "p1": 0.0}, False)):
        clicks = {t: {"query": t, "contexts": [ctx(c, gains) for c in ("austin", "boston")]} for t in others}
        table = miner.decide(found, proposals, texts, miner.evidence(others, parses, kept, clicks))
        row = table[(table["trigger"] == "pizza") & (table["new"] == '"pizza"') & (table["route"] == "pooled")].iloc[0]
        assert row["screened"] and row["confirm_texts"] == len(others) and bool(row["accepted"]) is accepted
        assert table.loc[~table["screened"].astype(bool), "q"].isna().all()  # only screened edits are tested


def test_abstention_leaves_an_unsupported_text_unknown():
    texts, greedy, targets = hand_built()
    last = len(texts) - 1
    for abstain, expected in ((True, None), (False, 0.0)):
        miner = EditMiner(SCHEMA, Reward(), seed_rows=[], abstain=abstain)
        found = miner.evidence(texts, greedy, miner.propose(texts, greedy), targets)
        assert {ev.effect for ev in found if ev.text == last} == {expected}


def test_a_vetoed_table_read_back_from_csv_is_what_relabels(tmp_path):
    texts, greedy, targets = hand_built()
    miner = EditMiner(SCHEMA, Reward(), seed_rows=[])
    table, proposals = miner.mine(texts, greedy, targets)
    table.to_csv(tmp_path / "edits.csv", index=False)
    kept = load_edit_table(tmp_path / "edits.csv")
    assert [p for p, _ in miner.apply(texts, greedy, proposals, kept)] == [
        p for p, _ in miner.apply(texts, greedy, proposals, table)
    ]
    kept.loc[kept["trigger"] == "pizza", "accepted"] = False  # the user vetoes the edit
    assert [p for p, _ in miner.apply(texts, greedy, proposals, kept)] == greedy
    bad = pd.read_csv(tmp_path / "edits.csv", keep_default_na=False, dtype=str).assign(accepted="maybe")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv: line 2: accepted must be true or false"):
        load_edit_table(tmp_path / "bad.csv")


def test_an_unknown_config_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown option.*alpah"):
        RFTRecipe.resolve(PRESETS["quick"], {"alpah": 0.1})
    assert RFTRecipe.resolve(PRESETS["quick"], {"alpha": 0.1, "texts": None}).alpha == 0.1


@pytest.mark.slow
def test_rft_and_self_training_run_through_the_cli(tiny_model, small_world, real_index, tmp_path):
    """Both on the small world and a real index from the tiny model: the labels, the edit table and a trained folder
    whose LoRA moved; self-training writes no table; an unknown config key exits 2 naming it."""
    import yaml
    from safetensors.torch import load_file

    (tmp_path / "tiny.yaml").write_text(
        yaml.safe_dump({"texts": 40, "max_steps": 2, "batch_size": 4, "bf16": False, "min_texts": 2})
    )
    common = [
        "--init",
        str(tiny_model),
        "--world",
        str(small_world),
        "--index",
        str(real_index),
        "--config",
        str(tmp_path / "tiny.yaml"),
    ]
    for name, extra in (("rft", []), ("st", ["--edits", "none"])):
        result = CliRunner().invoke(app, ["train", "rft", *common, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        out = tmp_path / name
        labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["log_texts"] == len(labels) > 0
        assert json.loads((out / "querytune.json").read_text())["stage"] == {"rft": "rft", "st": "self_train"}[name]
        assert any(w.abs().sum() > 0 for k, w in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k)
        if name == "st":
            assert not (out / "edits.csv").exists() and all(
                r["edits"] == [] and r["greedy"]["intent"] == r["intent"] for r in labels
            )
        else:
            assert (out / "edits.csv").is_file() and json.loads((out / "evidence.json").read_text())[
                "texts_with_clicks"
            ] > 0
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"alpah": 0.1}))
    result = CliRunner().invoke(
        app, ["train", "rft", *common[:6], "--config", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "alpah" in result.output


@pytest.mark.slow
def test_dpo_trains_on_the_miners_edits_through_the_cli(tiny_model, small_world, real_index, tmp_path):
    """`train dpo --edits-from RFT_RUN`: one pair per text its accepted edits changed (edited label chosen, greedy parse
    rejected); a run mined from another model is refused, and one whose miner accepted nothing exits 2 saying so."""
    import yaml

    from querytune.runtime.model import ModelFolder

    run = tmp_path / "rft"
    run.mkdir()
    greedy = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "italian"}}
    edited = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "pizza"}}
    edit = {"kind": "what", "trigger": "pizza", "slot": "cuisine", "old": "italian", "new": "pizza", "intent": None}
    rows = [{"id": f"q{i}", "text": f"pizza spot {i}", **edited, "greedy": greedy, "edits": [edit]} for i in range(4)]
    rows.append({"id": "q9", "text": "italian dinner", **greedy, "greedy": greedy, "edits": []})
    (run / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    version = ModelFolder.open(tiny_model).version
    (run / "greedy.jsonl").write_text(
        "".join(json.dumps({"text": r["text"], "greedy": greedy, "model_version": version}) + "\n" for r in rows)
    )
    (tmp_path / "tiny.yaml").write_text(
        yaml.safe_dump({"lora_r": 4, "lora_alpha": 8, "bf16": False, "max_minutes": 0, "max_steps": 1, "batch_size": 2})
    )
    common = [
        "train",
        "dpo",
        "--init",
        str(tiny_model),
        "--world",
        str(small_world),
        "--index",
        str(real_index),
        "--config",
        str(tmp_path / "tiny.yaml"),
    ]
    result = CliRunner().invoke(
        app, [*common, "--out", str(tmp_path / "dpo"), "--edits-from", str(run), "--max-minutes", "0"]
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "dpo" / "train_config.json").read_text())["max_minutes"] is None
    )  # 0: no cap (eval/compare.py's rows)
    pairs = pd.read_parquet(tmp_path / "dpo" / "pairs.parquet")
    assert len(pairs) == 4 and set(pairs["chosen"]) == {json.dumps(edited, separators=(",", ":"))}
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["steps"] == 1
    (run / "greedy.jsonl").write_text((run / "greedy.jsonl").read_text().replace(version, "another-model"))
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "dpo2"), "--edits-from", str(run)])
    assert result.exit_code == 2 and "parsed by another model" in result.output
    (run / "greedy.jsonl").write_text((run / "greedy.jsonl").read_text().replace("another-model", version))
    (run / "labels.jsonl").write_text(json.dumps(rows[-1]) + "\n")
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "dpo3"), "--edits-from", str(run)])
    assert result.exit_code == 2 and "accepted no edit" in result.output


def miner_run(folder: Path, world: Path, version: str) -> tuple[list[str], dict, dict]:
    """A `train rft` output folder by hand: four clicked early-log texts relabeled by one accepted edit (cuisine
    italian -> pizza, pooled effect +0.3) and two left alone; the texts, the greedy parse and the label."""
    from querytune.train.evidence import TABLE_COLUMNS
    from querytune.train.targets import click_targets

    texts = [t["query"] for t in click_targets(world, 6, seed=0)]
    greedy = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "italian"}}
    edited = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "pizza"}}
    edit = {"kind": "what", "trigger": "pizza", "slot": "cuisine", "old": "italian", "new": "pizza", "intent": None}
    rows = [
        {"id": f"q{i}", "text": t, **(edited if i < 4 else greedy), "greedy": greedy, "edits": [edit] if i < 4 else []}
        for i, t in enumerate(texts)
    ]
    folder.mkdir()
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "greedy.jsonl").write_text(
        "".join(json.dumps({"text": t, "greedy": greedy, "model_version": version}) + "\n" for t in texts)
    )
    row = dict.fromkeys(TABLE_COLUMNS, "") | {
        "kind": "what",
        "trigger": "pizza",
        "slot": "cuisine",
        "old": '"italian"',
        "new": '"pizza"',
        "route": "pooled",
        "effect": 0.3,
        "accepted": True,
    }
    pd.DataFrame([row], columns=TABLE_COLUMNS).to_csv(folder / "edits.csv", index=False)
    return texts, greedy, edited


@pytest.mark.slow
def test_the_evidence_reward_pays_the_accepted_edit_and_never_an_unpooled_one(
    tiny_model, small_world, real_index, tmp_path
):
    """The label earns its edits' pooled effect, the greedy parse 0, a broken parse -1,
    and any other parse at most 0."""
    from querytune.runtime.model import ModelFolder
    from querytune.train.grpo import EvidenceReward, evidence_targets
    from querytune.train.reward import retrieval_reward

    texts, greedy, edited = miner_run(tmp_path / "rft", small_world, ModelFolder.open(tiny_model).version)
    retrieval, schema = retrieval_reward(tiny_model, real_index)
    targets = evidence_targets(tmp_path / "rft", small_world, schema, anchors=1.0, max_contexts=8, seed=0)
    assert [t["label"] != t["greedy"] for t in targets] == [
        True,
        False,
        True,
        False,
        True,
        True,
    ]  # interleaved with the anchors
    reward = EvidenceReward(retrieval)
    other = json.dumps({"intent": "find_business", "slots": {"category": "bar"}})
    t = targets[0]
    cols = {k: [t[k]] * 4 for k in ("query", "greedy", "label", "label_reward")} | {
        "fmt": ["json"] * 4,
        "contexts": [json.dumps(t["contexts"])] * 4,
    }
    scores = reward(completions=[json.dumps(edited), json.dumps(greedy), "{broken", other], **cols)
    assert scores[:3] == [0.3, 0.0, -1.0] and scores[3] <= 0.0


@pytest.mark.slow
def test_grpo_trains_on_the_miners_verdicts_through_the_cli(tiny_model, small_world, real_index, tmp_path):
    """`train grpo --edits-from RFT_RUN`: the relabeled texts and as many anchors, each edited label in its group,
    the LoRA moves; an unknown config key exits 2 naming it."""
    import yaml
    from safetensors.torch import load_file

    from querytune.runtime.model import ModelFolder

    miner_run(tmp_path / "rft", small_world, ModelFolder.open(tiny_model).version)
    (tmp_path / "tiny.yaml").write_text(
        yaml.safe_dump(
            {
                "lora_r": 4,
                "lora_alpha": 8,
                "bf16": False,
                "max_minutes": 0,
                "max_steps": 2,
                "batch_size": 8,
                "num_generations": 4,
                "lr": 5e-3,
            }
        )
    )
    common = ["train", "grpo", "--init", str(tiny_model), "--world", str(small_world), "--index", str(real_index)]
    result = CliRunner().invoke(
        app,
        [
            *common,
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--out",
            str(tmp_path / "grpo"),
            "--edits-from",
            str(tmp_path / "rft"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert (
        summary["steps"] == 2
        and summary["guided_texts"] == 4
        and summary["edited_texts"] == 4
        and summary["anchor_texts"] == 2
    )
    steps = [json.loads(line) for line in (tmp_path / "grpo" / "steps.jsonl").read_text().splitlines()]
    assert all(s["guided"] >= 1 for s in steps)  # each step's two texts include an edited one (they alternate)
    assert any(
        w.abs().sum() > 0
        for k, w in load_file(tmp_path / "grpo" / "adapter_model.safetensors").items()
        if "lora_B" in k
    )
    # fewer texts (6) than a step takes (16 parses in pairs: 8) still train: TRL's sampler would drop the short batch
    (tmp_path / "wide.yaml").write_text(
        yaml.safe_dump(
            {
                "lora_r": 4,
                "lora_alpha": 8,
                "bf16": False,
                "max_minutes": 0,
                "max_steps": 1,
                "batch_size": 16,
                "num_generations": 2,
            }
        )
    )
    result = CliRunner().invoke(
        app,
        [
            *common,
            "--config",
            str(tmp_path / "wide.yaml"),
            "--out",
            str(tmp_path / "wide"),
            "--edits-from",
            str(tmp_path / "rft"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "each repeated to fill one" in result.output
        and json.loads((tmp_path / "wide" / "summary.json").read_text())["steps"] == 1
    )


@pytest.mark.parametrize("stage", ["sft", "rft", "dpo", "grpo"])
def test_an_unknown_config_key_fails_every_stage(stage, tmp_path):
    """Before any work: exit 2, the file and the unknown key named."""
    import yaml

    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"lr": 1e-3, "lerning_rate": 1e-3}))
    where = (
        ["--data", str(tmp_path / "seed.jsonl")]
        if stage == "sft"
        else ["--init", str(tmp_path / "m"), "--world", str(tmp_path), "--index", str(tmp_path)]
    )
    result = CliRunner().invoke(
        app, ["train", stage, *where, "--out", str(tmp_path / "out"), "--config", str(tmp_path / "typo.yaml")]
    )
    assert result.exit_code == 2 and "lerning_rate" in result.output and "typo.yaml" in result.output, result.output


class Laundromats:
    """A stand-in search over a four-business catalogue: category laundromat finds the laundromats (l1, l2) first,
    any other parse the city's best rated (x1, x2)."""

    catalog = pd.DataFrame(
        {
            "business_id": ["l1", "l2", "x1", "x2"],
            "name": ["Suds", "Spin City", "Cafe Uno", "Bistro Dos"],
            "category": ["laundromat", "laundromat", "cafe", "restaurant"],
            "cuisine": [None, None, None, "french"],
        }
    )
    embedder, k = None, 10

    def ranked(self, parse, user_city, timestamp):
        return ["l1", "l2", "x1"] if parse.slots.get("category") == "laundromat" else ["x1", "x2", "l1"]


def test_a_word_no_embedding_places_gets_the_value_its_users_clicked():
    """What an exploration bucket leaves in the log for a new word: the laundromats it showed were clicked."""
    texts = ["washeteria near me", "washeteria open now", "washeteria downtown", "cheap washeteria", "washeteria 24h",
             "washeteria with parking"]  # fmt: skip
    greedy = [{"intent": "find_business", "slots": {"near_me": True}} for _ in texts]
    targets = {t: {"query": t, "contexts": [ctx(c, {"l1": 0.8, "l2": 0.3, "x1": 0.1}) for c in ("austin", "miami")]}
               for t in texts}  # fmt: skip
    reward = Reward()
    reward.searcher = Laundromats()
    reward.ranked = reward.searcher.ranked
    plain = EditMiner(SCHEMA, reward, seed_rows=[])
    assert not any(e.new == "laundromat" for edits in plain.propose(texts, greedy) for e in edits)
    miner = EditMiner(SCHEMA, reward, seed_rows=[], click_values=True)
    table, proposals = miner.mine(texts, greedy, targets)
    row = table[(table["trigger"] == "washeteria") & (table["new"] == '"laundromat"')]
    assert len(row) == 1 and bool(row["accepted"].iloc[0]) and row["texts"].iloc[0] == len(texts)
    assert row["kind"].iloc[0] == "click"
    assert all(p["slots"]["category"] == "laundromat" for p, _ in miner.apply(texts, greedy, proposals, table))
    # clicks split between kinds propose nothing: a value needs at least half of the text's click gains
    split = {"query": "x", "contexts": [ctx("austin", {"l1": 0.4, "x1": 0.3, "x2": 0.3})]}
    assert miner.clicked_values(greedy[0], split) == []
