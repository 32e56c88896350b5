"""GRPO with a retrieval reward online: groups of parses per logged text, each scored against the text's clicks.

    querytune train grpo --init runs/sft --world runs/world --index runs/index --out runs/grpo --edits-from runs/rft
    querytune train grpo --init runs/sft --world runs/world --index runs/index --out runs/grpo

recipe (`GRPORecipe`) -> texts and reward -> TRL's GRPOTrainer (`querytune.train.step.SamplingGRPOTrainer`) on a fresh
LoRA over the merged init model, which is the KL reference -> the model folder.

With `edits_from` (a `querytune train rft` folder: the click-evidence miner's labels.jsonl and edits.csv), the reward is
the miner's, abstaining and pooled (`EvidenceReward`): the texts are those its accepted edits changed, each beside
`anchors` texts it left alone. Its edited parse is one member of the text's group (`guide`): the policy's own samples
almost never reach it (eval/RESULTS.md, coverage@K: 0 of 60 taxonomy texts among 8 samples), and a group that never
holds the better parse teaches nothing (off-policy guidance, as in LUFFY, Yan et al. 2025).

Without it, the reward is `querytune.train.reward.RetrievalReward` averaged over each text's contexts, on the early-log
texts a screen finds a learning signal in (`querytune.train.pairs.screen`), with anchors the model answers well.

Writes into OUT: targets.jsonl (the texts training draws from, so a resumed run continues on them), candidates.parquet
(when it screened), the step log, checkpoints, the model.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

from querytune.runtime import formats
from querytune.runtime.model import MAX_NEW_TOKENS
from querytune.schema import ParseError, Schema, normalize_text
from querytune.train.config import Recipe
from querytune.train.evidence import supported_diffs
from querytune.train.preference import policy, train_and_save
from querytune.train.reward import INVALID, RetrievalReward, strict_parse
from querytune.train.sft import StepLog, checkpoint_args, report_args, start_or_resume

NO_SIGNAL_WARN = 0.6  # warn when this share of groups, averaged over the last 10 steps, has all-equal rewards


@dataclass(frozen=True)
class GRPORecipe(Recipe):
    """What a GRPO run reads. The screening fields apply without `edits_from`; `guide` with it."""

    queries: int = 1500  # early-log texts drawn (and screened, when screen_k > 0)
    pick: str = "random"
    explore_below: float = 0.5
    explore_confidence: float = 0.35
    explore_with: str = "branch"
    constrained: bool = False  # free decoding while screening
    screen_k: int = 4  # rivals per screened text (0: no screening)
    improvable: bool = True  # keep texts where a rival beats the greedy parse in a way the clicks can decide
    anchors: float = (
        1.0  # texts the model already answers well, per trained text: they hold the policy where it is right
    )
    min_gap: float = 0.3
    guide: bool = True  # with edits_from: the miner's edited parse is one member of its text's group
    max_steps: int = 45
    num_iterations: int = 1  # optimizer steps per sampled batch (clipped ratio, as in PPO)
    num_generations: int = 8
    batch_size: int = 32  # sampled parses per step: texts per step x num_generations
    temperature: float = 0.8
    lr: float = 1e-4
    beta: float = 0.04  # KL coefficient towards the init model
    lora_r: int = 16
    lora_alpha: int = 32
    warmup_steps: int = 5
    bf16: bool = True
    max_minutes: float | None = 11.0
    save_steps: int = 10  # a step samples 32 parses: a checkpoint every ~2-3 min
    use_vllm: bool = False
    # step levers (eval/bench_preference.py: 1.41x together): the LM head only at scored positions, frozen weights
    # in bf16, sampling with the adapters merged
    compact_head: bool = True
    bf16_weights: bool = True
    merged_sampling: bool = True


PRESETS: dict[str, GRPORecipe] = {
    # quick: <= 20 minutes on 2 CPU cores (screening ~6 min, then 45 steps of ~12-13 s)
    "quick": GRPORecipe(),
    "full": GRPORecipe(
        queries=8000, pick="traffic", constrained=True, max_steps=600, batch_size=64, warmup_steps=10, max_minutes=None
    ),
}


class EvidenceReward:
    """The click-evidence miner's reward, in TRL's reward shape, relative to each text's greedy parse (NDCG@10 units):
    - its edited parse (the greedy parse with the accepted edits): the edits' pooled effect, summed;
    - the greedy parse: 0;
    - any other parse the reward would search: its abstaining evidence against the greedy parse, the mean over the
      text's supported contexts (`supported_diffs`), capped at 0: one text's clicks may show a parse is worse, but
      only pooled evidence may call one better; no supported context: 0 (unknown);
    - a parse it would not search (broken, off the schema, out of scope, a name the text does not write): `INVALID`.
    Columns: query, greedy and label (JSON), label_reward, contexts, fmt."""

    __name__ = "evidence_reward"  # TRL names a reward function's log columns after it

    def __init__(self, reward: RetrievalReward):
        self.reward, self.schema = reward, reward.schema
        self.calls = 0

    def one(
        self, query: str, completion: str, fmt: str, greedy: str, label: str, label_reward: float, contexts: list[dict]
    ) -> float:
        self.calls += 1
        try:
            parse = strict_parse(self.schema, completion, self.reward.max_chars, fmt)
        except ParseError:
            return INVALID
        if not self.reward.searchable(parse, query):
            return INVALID
        as_json = parse.to_json()
        if as_json == label:
            return float(label_reward)
        if as_json == greedy:
            return 0.0
        diffs = supported_diffs(self.reward, self.schema.parse(json.loads(greedy)), parse, contexts)
        return round(min(0.0, sum(diffs) / len(diffs)), 5) if diffs else 0.0

    def __call__(
        self,
        prompts=None,
        completions=None,
        query=None,
        fmt=None,
        greedy=None,
        label=None,
        label_reward=None,
        contexts=None,
        **_,
    ) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [
            self.one(q, c, f, g, lab, r, json.loads(x))
            for q, c, f, g, lab, r, x in zip(query, texts, fmt, greedy, label, label_reward, contexts, strict=True)
        ]

    @property
    def search_calls(self) -> int:
        return self.reward.search_calls


def evidence_targets(
    edits_from: Path, world: Path, schema: Schema, anchors: float, max_contexts: int, seed: int
) -> list[dict]:
    """The texts the miner's accepted edits changed (`edits_from`/labels.jsonl), each with its greedy parse, its label
    and the label's reward (the pooled effects of its edits, from edits.csv), interleaved with `anchors` x as many texts
    it left alone; only texts with clicks, each with its contexts."""
    from querytune.train.rft import load_edit_table
    from querytune.train.targets import text_targets

    labels, table = edits_from / "labels.jsonl", edits_from / "edits.csv"
    if not labels.is_file() or not table.is_file():
        raise FileNotFoundError(
            f"{edits_from}: no labels.jsonl and edits.csv here (a `querytune train rft` output folder)"
        )
    effects = {
        (r.kind, r.trigger, r.slot, r.old, r.new): float(r.effect)
        for r in load_edit_table(table).itertuples()
        if r.accepted
    }
    rows = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    clicked = text_targets(world, [r["text"] for r in rows], seed=seed, max_contexts=max_contexts)
    canon = lambda p: schema.parse({"intent": p["intent"], "slots": p["slots"]}).to_json()  # noqa: E731

    def target(r: dict, label_reward: float) -> dict:
        t = clicked[normalize_text(r["text"])]
        return {
            "query": r["text"],
            "greedy": canon(r["greedy"]),
            "label": canon(r),
            "label_reward": round(label_reward, 5),
            "contexts": t.get("contexts") or [t],
        }

    rows = [r for r in rows if normalize_text(r["text"]) in clicked and r.get("greedy")]
    edited = [
        target(
            r,
            sum(
                effects.get((e["kind"], e["trigger"], e["slot"], json.dumps(e["old"]), json.dumps(e["new"])), 0.0)
                for e in r["edits"]
            ),
        )
        for r in rows
        if r["edits"]
    ]
    if not edited:
        raise ValueError(f"{edits_from}: the miner accepted no edit for a clicked text: nothing for GRPO to learn")
    left = [r for r in rows if not r["edits"]]
    random.Random(seed).shuffle(left)
    kept = [target(r, 0.0) for r in left[: round(anchors * len(edited))]]
    return [t for pair in zip_longest(edited, kept) for t in pair if t is not None]


def sampled_targets(
    recipe: GRPORecipe,
    init: Path,
    world: Path,
    reward: RetrievalReward,
    schema: Schema,
    out: Path,
    seed: int,
    say=print,
) -> tuple[list[dict], dict[str, Any]]:
    """Early-log texts, screened for a learning signal (when `screen_k`), with anchors; the counts."""
    from querytune.train.pairs import anchor_targets, scored_candidates, screen
    from querytune.train.targets import click_targets, sample_candidates

    targets = click_targets(world, recipe.queries, seed=seed, pick=recipe.pick)
    if not targets:
        raise ValueError(f"{world}: no clicked queries in the early log outside the seed set")
    if not recipe.screen_k:
        return targets, {"screened_queries": None, "queries_with_signal": None, "anchor_queries": None}
    say(f"GRPO: screening {len(targets):,} logged queries with {recipe.screen_k} samples each")
    candidates, confidence = sample_candidates(
        init,
        targets,
        recipe.screen_k,
        recipe.temperature,
        seed,
        say=say,
        reward=reward,
        explore_below=recipe.explore_below,
        explore_confidence=recipe.explore_confidence,
        explore_with=recipe.explore_with,
        constrained=recipe.constrained,
    )
    scored_candidates(targets, candidates, reward, confidence).to_parquet(out / "candidates.parquet", index=False)
    pool, kept = targets, screen(targets, candidates, reward, schema=schema, improvable=recipe.improvable)
    what = "another parse that beats the greedy one" if recipe.improvable else "parses with different rewards"
    say(f"GRPO: {len(kept):,} of {len(pool):,} queries have {what}; training on those")
    if not kept:
        raise ValueError(
            f"no screened query has {what}: nothing for GRPO to learn (raise --queries, --temperature or --screen-k)"
        )
    stats = {"screened_queries": len(pool), "queries_with_signal": len(kept), "anchor_queries": 0}
    if recipe.anchors:
        anchors = anchor_targets(
            pool,
            candidates,
            reward,
            round(recipe.anchors * len(kept)),
            recipe.min_gap,
            schema,
            skip={t["query"] for t in kept},
        )
        say(
            f"GRPO: + {len(anchors):,} anchor queries (answered well, and a 'what'/'where' slot matters to their "
            "clicks)"
        )
        stats["anchor_queries"] = len(anchors)
        kept = [t for pair in zip_longest(kept, anchors) for t in pair if t is not None]
    return kept, stats


def train_grpo(
    targets: list[dict],
    reward,
    init: Path,
    out: Path,
    recipe: GRPORecipe,
    seed: int = 0,
    say=print,
    resume: bool = False,
    report_to: str = "none",
) -> dict[str, Any]:
    """GRPO on `targets` with `reward` (a `RetrievalReward` over each target's contexts, or an `EvidenceReward` when the
    targets carry labels: then, with `recipe.guide`, each label is one member of its text's group)."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig

    from querytune.train.step import SamplingGRPOTrainer

    torch.manual_seed(seed)
    tokenizer, model, lora, meta, schema = policy(init, recipe.lora_r, recipe.lora_alpha)
    fmt = formats.folder_format(meta)  # the policy writes its completions in it; the `fmt` column tells the reward
    evidence = isinstance(reward, EvidenceReward)
    rows = []
    for t in targets:
        row = {
            "prompt": formats.prompt(fmt, schema, tokenizer, t["query"]),
            "query": t["query"],
            "fmt": fmt,
            "contexts": json.dumps(t.get("contexts") or [t]),
        }
        if evidence:
            row |= {"greedy": t["greedy"], "label": t["label"], "label_reward": t["label_reward"]}
        else:
            row |= {"user_city": t["user_city"], "timestamp": t["timestamp"], "gains": json.dumps(t["gains"])}
        rows.append(row)
    per_step = recipe.batch_size // recipe.num_generations
    if len(rows) < per_step:  # TRL's sampler drops a short last batch: a smaller text set would train no step at all
        say(f"GRPO: {len(rows)} texts for {per_step} a step: each repeated to fill one")
        rows = [rows[i % len(rows)] for i in range(per_step)]
    guides = {}
    if evidence and recipe.guide:  # prompt tokens -> the edited parse's tokens, for the texts whose label differs
        for r in rows:
            if r["label"] != r["greedy"]:
                label = formats.completion(fmt, schema.parse(json.loads(r["label"]))) + tokenizer.eos_token
                guides[tuple(tokenizer(r["prompt"], add_special_tokens=False).input_ids)] = tokenizer(
                    label, add_special_tokens=False
                ).input_ids
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
            return (
                f"warning: {sum(window) / len(window):.0%} of groups over the last 10 steps had equal rewards (no "
                "learning signal): raise --temperature or --num-generations, or start from a weaker model"
            )
        return None

    log = StepLog(
        out / "steps.jsonl",
        say,
        recipe.max_minutes,
        extra={
            "reward": "reward",
            "reward_std": "reward_std",
            "no_signal": "frac_reward_zero_std",
            "kl": "kl",
            "completion_len": "completions/mean_length",
            "sampling_s": "sampling_seconds",
            "guided": "guided",
        },
        watch=watch,
        quiet={"sampling_s"},
    )
    args = GRPOConfig(
        **checkpoint_args(out, recipe.save_steps),
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        num_generations=recipe.num_generations,
        max_completion_length=int(meta.get("max_new_tokens", MAX_NEW_TOKENS)),
        # each batch of sampled groups serves `num_iterations` optimizer steps: sampling dominates a step on CPU
        num_iterations=recipe.num_iterations,
        temperature=recipe.temperature,
        top_k=0,
        top_p=1.0,
        learning_rate=recipe.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=recipe.warmup_steps,
        beta=recipe.beta,
        logging_steps=1,
        **report_args(out, report_to),
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=recipe.bf16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_vllm=recipe.use_vllm,
        vllm_mode="colocate",
    )
    trainer = SamplingGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[log.callback],
        merged_sampling=recipe.merged_sampling,
        guides=guides,
    )
    result, seconds, steps = train_and_save(trainer, tokenizer, init, out, schema, meta, "grpo", recipe, last)
    head, tail = steps[: max(1, len(steps) // 10)], steps[-max(1, len(steps) // 10) :]
    mean = lambda rows, k: round(sum(r.get(k, 0.0) for r in rows) / len(rows), 4)  # noqa: E731
    return {
        "stage": "grpo",
        "init": str(init),
        "queries": len(targets),
        "guided_texts": len(guides),
        "steps": result.global_step,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, result.global_step), 2),
        "reward_start": mean(head, "reward"),
        "reward_end": mean(tail, "reward"),
        "no_signal_start": mean(head, "no_signal"),
        "no_signal_end": mean(tail, "no_signal"),
        "kl_end": mean(tail, "kl"),
        "no_signal_warning_at_step": warned[0] if warned else None,
        "reward_calls": reward.calls,
        "searches": reward.search_calls,
    }


def run_grpo(
    recipe: GRPORecipe,
    init: Path,
    world: Path,
    index: Path,
    out: Path,
    edits_from: Path | None = None,
    seed: int = 0,
    say=print,
    resume: bool = False,
    report_to: str = "none",
) -> dict[str, Any]:
    """Texts and reward (the miner's with `edits_from`, else sampled and screened), then GRPO; the summary."""
    from querytune.train.reward import retrieval_reward
    from querytune.train.targets import MAX_CONTEXTS

    if recipe.batch_size % recipe.num_generations:
        raise ValueError(
            f"batch_size {recipe.batch_size} must be a multiple of num_generations {recipe.num_generations}"
        )
    if (
        edits_from and recipe.guide and recipe.use_vllm
    ):  # vLLM's sampling log-probabilities would not describe the guides
        raise ValueError(
            "guide: the miner's parses join their groups in transformers' sampling only; "
            "set use_vllm false or guide false"
        )
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    retrieval, schema = retrieval_reward(init, index)
    reward = EvidenceReward(retrieval) if edits_from else retrieval
    saved = out / "targets.jsonl"  # the texts training draws from, so `--resume` continues on the same ones
    stats: dict[str, Any] = {}
    if resume and saved.is_file():
        targets = [json.loads(line) for line in saved.read_text().splitlines()]
    elif edits_from:
        targets = evidence_targets(edits_from, world, schema, recipe.anchors, MAX_CONTEXTS, seed)
        stats = {
            "edited_texts": sum(t["label"] != t["greedy"] for t in targets),
            "anchor_texts": sum(t["label"] == t["greedy"] for t in targets),
            "evidence_from": str(edits_from),
        }
        say(
            f"GRPO: {stats['edited_texts']:,} texts the miner's edits changed (in {edits_from}) "
            f"+ {stats['anchor_texts']:,} it left alone"
        )
    else:
        targets, stats = sampled_targets(recipe, init, world, retrieval, schema, out, seed, say)
    saved.write_text("".join(json.dumps(t) + "\n" for t in targets))
    say(f"GRPO: {len(targets):,} logged queries, {recipe.num_generations} samples each, {recipe.max_steps} steps")
    summary = (
        train_grpo(targets, reward, init, out, recipe, seed=seed, say=say, resume=resume, report_to=report_to) | stats
    )
    return summary | {"total_seconds": round(time.perf_counter() - t0, 1)}
