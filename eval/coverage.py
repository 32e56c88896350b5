r"""Coverage@K: how often each way of proposing parses holds the true one, per world mechanism, before any training.

    python eval/coverage.py --world runs/w0 --index runs/w0_index --sft runs/w0_sft --out runs/coverage_w0.json \
        [--per-mechanism 100]

For the early-log texts that the reward stages add to the seed (`querytune.train.targets.early_texts`), up to
`--per-mechanism` of each mechanism's texts (and of those no mechanism touches): the share whose true parse (the
world's hidden need) is the SFT model's greedy parse, among its K samples (temperature 1), among its K beams
(constrained), and among the evidence miner's candidates (the greedy parse and each single-slot edit it proposes,
`querytune.train.evidence`). It decides what proposes candidates; an evaluation, it reads the world's audit.
Prints a markdown table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/coverage.py` from a checkout

from querytune.labeled import load_labeled  # noqa: E402
from querytune.machine import hardware  # noqa: E402
from querytune.runtime.generate import Parser  # noqa: E402
from querytune.runtime.model import ModelFolder  # noqa: E402
from querytune.schema import ParseError, Schema  # noqa: E402
from querytune.train.evidence import EditMiner  # noqa: E402
from querytune.train.reward import retrieval_reward, strict_parse  # noqa: E402
from querytune.train.rft import self_labels  # noqa: E402
from querytune.train.targets import as_json, early_texts  # noqa: E402

MECHANISMS = ("taxonomy", "filter_guideline", "generic_name", "drift", "none")


def canonical(schema: Schema, parse: dict | str | None) -> str | None:
    """A parse (dict, or a completion held as JSON) as canonical JSON, or None when it does not read."""
    if parse is None:
        return None
    try:
        return (strict_parse(schema, parse) if isinstance(parse, str) else schema.parse(parse)).to_json()
    except ParseError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="World folder (log.parquet, seed.jsonl, audit/).")
    ap.add_argument(
        "--index", type=Path, required=True, help="Index folder of the same world (the miner's searcher and embedder)."
    )
    ap.add_argument("--sft", type=Path, required=True, help="The SFT model folder whose parses are measured.")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    ap.add_argument("--texts", type=int, default=4000, help="Early-log texts to draw from (the reward stages' texts).")
    ap.add_argument(
        "--per-mechanism", type=int, default=100, help="Texts per mechanism (and of the untouched ones) measured."
    )
    ap.add_argument("-k", type=int, default=8, help="Samples and beams per text.")
    args = ap.parse_args()

    schema = ModelFolder.open(args.sft).schema
    needs = pd.read_parquet(args.world / "audit" / "needs.parquet").set_index("query_id")
    rows = early_texts(args.world, args.texts)
    picked: dict[str, list[dict]] = {m: [] for m in MECHANISMS}
    for r in rows:
        tags = [m for m in str(needs.at[r["query_id"], "mechanisms"] or "").split(",") if m] or ["none"]
        for m in tags:
            if m in picked and len(picked[m]) < args.per_mechanism:
                picked[m].append(r)
    chosen = list({r["query_id"]: r for rs in picked.values() for r in rs}.values())
    texts = [r["text"] for r in chosen]
    truth = {
        r["query_id"]: canonical(
            schema, {"intent": needs.at[r["query_id"], "intent"], "slots": json.loads(needs.at[r["query_id"], "slots"])}
        )
        for r in chosen
    }
    t0 = time.perf_counter()
    greedy = self_labels(args.sft, texts)
    parser = Parser(args.sft, batch_size=48, constrained=True)
    samples = parser.sample(texts, args.k, temperature=1.0, seed=0, constrained=False)
    beams = parser.beams(texts, args.k)
    reward, _ = retrieval_reward(args.sft, args.index)
    seed_rows = [{"intent": r.intent, "slots": r.slots} for r in load_labeled(args.world / "seed.jsonl", schema)[0]]
    miner = EditMiner(schema, reward, seed_rows)
    proposals = miner.propose(texts, greedy)
    seconds = round(time.perf_counter() - t0, 1)

    sets = {}
    for i, r in enumerate(chosen):
        g = canonical(schema, greedy[i])
        edits = {canonical(schema, e.apply(greedy[i], schema)) for e in proposals[i]} if greedy[i] else set()
        sets[r["query_id"]] = {
            "greedy": {g},
            f"samples@{args.k}": {canonical(schema, as_json(schema, parser.format, s)) for s in samples[i]},
            f"beams@{args.k}": {canonical(schema, as_json(schema, parser.format, s)) for s in beams[i]},
            "miner": {g} | edits,
        }
        sets[r["query_id"]]["miner + samples"] = sets[r["query_id"]]["miner"] | sets[r["query_id"]][f"samples@{args.k}"]
    ways = list(next(iter(sets.values())))
    table = {}
    for m, rs in picked.items():
        if rs:
            table[m] = {"n": len(rs)} | {
                w: round(sum(truth[r["query_id"]] in sets[r["query_id"]][w] for r in rs) / len(rs), 3) for w in ways
            }
    table["candidates_per_text"] = {
        w: round(sum(len(s[w] - {None}) for s in sets.values()) / len(sets), 2) for w in ways
    }
    result = {
        "table": table,
        "meta": {
            "world": str(args.world),
            "sft": str(args.sft),
            "k": args.k,
            "texts": len(chosen),
            "seconds": seconds,
            "hardware": hardware(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Coverage of the true parse, {args.world}, from {args.sft} ({hardware()}; {seconds} s):",
        "",
        "| texts | n | " + " | ".join(ways) + " |",
        "|---|---|" + "---|" * len(ways),
    ]
    lines += [
        f"| {m} | {t['n']} | " + " | ".join(f"{t[w]:.3f}" for w in ways) + " |"
        for m, t in table.items()
        if m != "candidates_per_text"
    ]
    lines += [
        "| distinct candidates per text | | "
        + " | ".join(f"{table['candidates_per_text'][w]:.1f}" for w in ways)
        + " |"
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
