"""RFT (and self-training): SFT continued on the seed plus log texts labeled by the model itself, with the edits
that the clicks support.

    querytune train rft --init runs/sft --world runs/world --index runs/index --out runs/rft
    # self-training:
    querytune train rft --init runs/sft --world runs/world --index runs/index --out runs/st --edits none

texts (`early_texts`: the log texts every reward stage and eval/compare.py's ceiling rows add) -> the init model's
constrained greedy parse of each, as `querytune label` writes it -> click evidence for single-slot edits of those
parses (`querytune.train.evidence`) -> the parses with the accepted edits -> SFT from the init model on the seed
plus them (`querytune.train.sft.train_sft`: the quick preset's step and levers for `max_steps` steps).

With `edits="none"` the stage is self-training (ST): the same texts, steps, batch, mixture and learning rate,
labeled by the model's own parse. ST is the control a reward stage must beat: more log texts help whatever their
labels (eval/RESULTS.md, "The ceiling table"), so only what the clicks change may count.

Writes into OUT: greedy.jsonl (the init model's parse of every text, which another run of the same model and texts
may reuse), labels.jsonl (the added rows: text, the label trained on, the greedy parse, the edits made),
edits.csv (every tested edit with its trigger, support, effect, interval and verdict; `edits` may name a vetoed
copy to train on), evidence.json (counts), then the model folder. labels.jsonl is kept across a stopped run:
`resume` reuses it and continues training from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from querytune.labeled import LabeledRow, load_labeled
from querytune.runtime.model import ModelFolder
from querytune.schema import normalize_text
from querytune.train.config import Recipe
from querytune.train.evidence import TABLE_COLUMNS, EditMiner
from querytune.train.sft import PRESETS as SFT_PRESETS
from querytune.train.sft import SFTRecipe, train_sft
from querytune.train.targets import early_texts, text_targets, texts_with


@dataclass(frozen=True)
class RFTRecipe(Recipe):
    """Everything an RFT (or ST) run reads; a preset is an instance, a config file or option overrides fields."""

    texts: int = 4000  # early-log texts added to the seed (eval/compare.py's ceiling rows add the same ones)
    edits: str = "mined"  # "mined", "none" (self-training) or the path of an edit table (a vetoed edits.csv)
    max_contexts: int = 8  # logged contexts per text the evidence is scored in
    near: int = 2  # closed-list values / filters an n-gram proposes by embedding
    min_similarity: float = 0.5  # cosine an n-gram needs to propose a value or filter
    click_values: bool = False  # also propose the "what" value a text's clicks point to (the closed loop's round)
    alpha: float = 0.05  # false-discovery rate of the pooled tests
    screen_p: float = 0.05  # an edit goes on to confirmation when its pooled p on the training texts is at most this
    confirm_texts: int = (
        30  # other log texts per screened trigger its confirmation is tested on (0: one stage, every edit tested)
    )
    min_effect: float = 0.0  # mean NDCG@10 gain a pooled edit needs
    min_texts: int = 3  # texts with evidence a pooled test needs
    text_margin: float = 0.3  # single-text route: gain in each supported context
    text_contexts: int = 0  # single-text route: supported contexts needed (0: off; why: eval/RESULTS.md)
    pool: bool = True  # False: the ablation that accepts any edit one text's clicks prefer
    abstain: bool = True  # False: the ablation that scores unsupported contexts 0
    shuffle_clicks: bool = False  # the placebo: each text judged on another text's clicks
    max_steps: int = 280  # SFT steps on seed + labeled texts
    batch_size: int = 8
    lr: float = 1.5e-3
    bf16: bool | str = "auto"  # "auto": the dtype probe's pick (`querytune.train.step.pick_dtype`)
    max_minutes: float | None = None  # a cap against a runaway; the steps are the budget
    save_steps: int = 100

    def sft_recipe(self) -> SFTRecipe:
        """The training step's recipe: SFT quick's step and levers, this run's steps, batch and learning rate."""
        return dataclasses.replace(
            SFT_PRESETS["quick"],
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            bf16=self.bf16,
            max_minutes=self.max_minutes,
            save_steps=self.save_steps,
        )


PRESETS = {
    # quick: the 4,000 texts and 280 steps of eval/compare.py's rows;
    # ~6 min of greedy parses and ~5 of training on 2 cores
    "quick": RFTRecipe(),
    "full": RFTRecipe(texts=8000, max_steps=600),
}


def self_labels(init: Path, texts: list[str], say=print) -> list[dict[str, Any] | None]:
    """The init model's constrained greedy parse of each text, grounded (what `querytune label` writes), or None
    where it is invalid. Decoded freely first and again, constrained, only where the free output is invalid: a
    valid free output used only tokens the grammar allows, so constrained decoding writes the same."""
    from rich.progress import Progress

    from querytune.runtime.generate import Parser

    parser = Parser(init, batch_size=48, constrained=False)
    t0 = time.perf_counter()
    with Progress(*Progress.get_default_columns()) as bar:
        task = bar.add_task("greedy parses", total=len(texts))
        preds = parser.parse(texts, progress=lambda n: bar.advance(task, n))
    redo = [i for i, p in enumerate(preds) if not p.valid]
    if redo:
        parser.constrained = True
        for i, p in zip(redo, parser.parse([texts[i] for i in redo])):
            preds[i] = p
    say(
        f"greedy parses of {len(texts):,} log texts in {time.perf_counter() - t0:.0f}s ({len(redo)} decoded again "
        "inside the grammar)"
    )
    return [p.parse if p.valid else None for p in preds]


def load_edit_table(path: Path) -> pd.DataFrame:
    """An edit table written by a run (`edits.csv`), perhaps vetoed by hand (rows removed or `accepted` set to
    false)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: edit table not found")
    table = pd.read_csv(path, keep_default_na=False, dtype=str)  # "null" and "true" stay the JSON cells they are
    missing = set(TABLE_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    bad = table.index[~table["accepted"].str.lower().isin(["true", "false"])]
    if len(bad):
        raise ValueError(
            f"{path}: line {int(bad[0]) + 2}: accepted must be true or false, got {table.at[bad[0], 'accepted']!r}"
        )
    table["accepted"] = table["accepted"].str.lower() == "true"
    table["effect"] = pd.to_numeric(table["effect"])
    return table


def reuse_greedy(path: Path, texts: list[str], version: str) -> list[dict[str, Any] | None]:
    """The greedy parses another run of the same model wrote for the same texts (its greedy.jsonl), checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: greedy parses not found")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [r["text"] for r in rows] != texts:
        raise ValueError(f"{path}: holds other texts than this run's {len(texts):,} (another world, seed or --texts)")
    if any(r.get("model_version") != version for r in rows):
        raise ValueError(f"{path}: parsed by another model than --init (model version {version})")
    return [r["greedy"] for r in rows]


def confirm(
    miner: EditMiner,
    screened: set[tuple],
    init: Path,
    world: Path,
    texts: list[str],
    config: RFTRecipe,
    seed: int,
    say=print,
):
    """The screened edits' evidence on other log texts: up to `confirm_texts` clicked early-log texts per trigger,
    outside the training texts and the seed, parsed by the init model; only the screened edits are scored there."""
    triggers = {key[1] for key in screened}
    others = texts_with(world, triggers, {normalize_text(t) for t in texts}, config.confirm_texts)
    say(
        f"{len(screened)} edits pass the screen (p <= {config.screen_p}); confirming them on {len(others):,} other log "
        "texts"
    )
    greedy = self_labels(init, others, say)
    targets = text_targets(
        world, others, seed=seed + 1, shuffle_clicks=config.shuffle_clicks, max_contexts=config.max_contexts
    )
    proposals = [
        [e for e in edits if e.key in screened]
        for edits in miner.propose(others, greedy, targets if miner.click_values else None)
    ]
    return miner.evidence(others, greedy, proposals, targets), len(others)


def build_labels(
    config: RFTRecipe,
    init: Path,
    world: Path,
    index: Path,
    out: Path,
    seed: int = 0,
    say=print,
    greedy_from: Path | None = None,
) -> dict[str, Any]:
    """Write OUT/labels.jsonl (and greedy.jsonl, edits.csv, evidence.json): the log texts with the labels this stage
    trains on. `greedy_from`: another run's greedy.jsonl of the same model and texts, reused instead of
    parsing again."""
    from rich.progress import Progress

    from querytune.train.reward import retrieval_reward

    folder = ModelFolder.open(init)
    schema = folder.schema
    rows = early_texts(world, config.texts, seed)
    texts = [r["text"] for r in rows]
    greedy = reuse_greedy(greedy_from, texts, folder.version) if greedy_from else self_labels(init, texts, say)
    with open(out / "greedy.jsonl", "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"text": t, "greedy": g, "model_version": folder.version}, ensure_ascii=False) + "\n"
            for t, g in zip(texts, greedy)
        )
    stats: dict[str, Any] = {
        "texts": len(texts),
        "greedy_invalid": sum(g is None for g in greedy),
        "edits": config.edits,
    }
    labels, made = greedy, [[] for _ in texts]
    if config.edits != "none":
        reward, _ = retrieval_reward(init, index)
        seed_rows = [{"intent": r.intent, "slots": r.slots} for r in load_labeled(world / "seed.jsonl", schema)[0]]
        miner = EditMiner(
            schema,
            reward,
            seed_rows,
            near=config.near,
            min_similarity=config.min_similarity,
            alpha=config.alpha,
            min_effect=config.min_effect,
            min_texts=config.min_texts,
            text_margin=config.text_margin,
            text_contexts=config.text_contexts,
            pool=config.pool,
            abstain=config.abstain,
            screen_p=config.screen_p,
            click_values=config.click_values,
        )
        targets = text_targets(
            world, texts, seed=seed, shuffle_clicks=config.shuffle_clicks, max_contexts=config.max_contexts
        )
        t0 = time.perf_counter()
        proposals = miner.propose(texts, greedy, targets if miner.click_values else None)
        found, confirmation = [], None
        if config.edits == "mined":
            with Progress(*Progress.get_default_columns()) as bar:
                task = bar.add_task("click evidence", total=len(texts))
                found = miner.evidence(texts, greedy, proposals, targets, progress=lambda n: bar.advance(task, n))
            if config.confirm_texts and (screened := miner.screened(found)):
                confirmation, stats["confirm_texts"] = confirm(miner, screened, init, world, texts, config, seed, say)
                stats["screened"] = len(screened)
            table = miner.decide(found, proposals, texts, confirmation)
            table.to_csv(out / "edits.csv", index=False)
        else:  # a table the user vetoed: its verdicts stand, nothing is scored again
            table = load_edit_table(Path(config.edits))
        relabeled = miner.apply(texts, greedy, proposals, table)
        labels, made = [p for p, _ in relabeled], [e for _, e in relabeled]
        stats |= {
            "texts_with_clicks": len(targets),
            "proposed": sum(map(len, proposals)),
            "scored": len(found),
            "unknown": sum(ev.effect is None for ev in found),
            "tested": int(pd.to_numeric(table["q"], errors="coerce").notna().sum()),
            "accepted_pooled": int((table["accepted"] & (table["route"] == "pooled")).sum()) if len(table) else 0,
            "accepted_single_text": int((table["accepted"] & (table["route"] == "text")).sum()) if len(table) else 0,
            "texts_edited": sum(bool(e) for e in made),
            "searches": reward.search_calls,
            "mining_seconds": round(time.perf_counter() - t0, 1),
        }
        say(
            f"{stats['proposed']:,} edits proposed, {stats['scored']:,} scored against the clicks "
            f"({stats['unknown']:,} unknown: no supported context), {stats['accepted_pooled']} accepted pooled and "
            f"{stats['accepted_single_text']} for one text; {stats['texts_edited']:,} texts relabeled (table: "
            f"{out / 'edits.csv'})"
        )
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        for r, label, g, edits in zip(rows, labels, greedy, made):
            if label is not None:
                f.write(
                    json.dumps(
                        {
                            "id": r["query_id"],
                            "text": r["text"],
                            **label,
                            "greedy": g,
                            "edits": [dataclasses.asdict(e) for e in edits],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    (out / "evidence.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def write_click_aliases(out: Path) -> list[dict[str, Any]]:
    """The accepted `click` edits of OUT/edits.csv (a word's value that its users' clicks chose, through the pooled
    test), written to the model folder's querytune.json as `click_aliases` with their evidence."""
    table = load_edit_table(out / "edits.csv")
    rows = table[(table["kind"] == "click") & table["accepted"].astype(bool)]
    aliases = [
        {
            "trigger": r.trigger,
            "slot": r.slot,
            "value": json.loads(r.new),
            "texts": int(r.texts),
            "effect": float(r.effect),
            "q": float(r.q) if r.q not in ("", None) else None,
        }
        for r in rows.itertuples()
    ]
    meta_file = out / "querytune.json"
    meta = json.loads(meta_file.read_text())
    meta["click_aliases"] = aliases
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return aliases


def train_rft(
    config: RFTRecipe,
    init: Path,
    world: Path,
    index: Path,
    out: Path,
    seed: int = 0,
    say=print,
    resume: bool = False,
    report_to: str = "none",
    greedy_from: Path | None = None,
) -> dict[str, Any]:
    """Labels (reused when OUT/labels.jsonl exists and `resume`), then SFT from `init` on the seed plus them;
    the summary."""
    out.mkdir(parents=True, exist_ok=True)
    stats = json.loads((out / "evidence.json").read_text()) if resume and (out / "labels.jsonl").is_file() else None
    if stats is None:
        stats = build_labels(config, init, world, index, out, seed, say, greedy_from)
    schema = ModelFolder.open(init).schema
    seed_rows, _ = load_labeled(world / "seed.jsonl", schema)
    added, rejects = load_labeled(out / "labels.jsonl", schema)
    if rejects:
        raise ValueError(f"{out / 'labels.jsonl'}: line {rejects[0].where}: {rejects[0].reason}")
    mixed: list[LabeledRow] = seed_rows + added
    random.Random(seed).shuffle(mixed)
    stage = "self_train" if config.edits == "none" else "rft"
    say(
        f"{stage}: SFT from {init} on {len(seed_rows):,} seed rows + {len(added):,} labeled log texts, "
        f"{config.max_steps} steps x {config.batch_size}"
    )
    summary = train_sft(
        mixed,
        schema,
        out,
        None,
        config.sft_recipe(),
        seed=seed,
        say=say,
        init=init,
        resume=resume,
        stage=stage,
        report_to=report_to,
    )
    edited = sum(bool(json.loads(line)["edits"]) for line in (out / "labels.jsonl").read_text().splitlines())
    if (out / "edits.csv").is_file():
        write_click_aliases(out)
    return summary | {
        "stage": stage,
        "init": str(init),
        "log_texts": len(added),
        "texts_edited": edited,
        "evidence": stats,
        "seed_texts": len({normalize_text(r.text) for r in seed_rows}),
    }
