"""Labeling benchmark: distinct queries per second by output format and backend, and what the compact format keeps.

    python eval/bench_labeling.py [--workspace workspace] [--queries 1000]

Runs against what `make demo` leaves in the workspace: models/sft (the default, compact format) and the world (its
log and test set). The JSON-format twin, models/sft_json (same data, steps, seed and dtype choice, `--format json`),
is trained first when missing (about 15-20 minutes on 2 cores). Every figure comes from this run, on the same
`--queries` distinct queries drawn from the log:
- vLLM backend (run in the vLLM environment, .venv-vllm, when it exists): the compact model's queries/s against the
  JSON twin's; both models' intent accuracy and slot F1 on the world's test set, the difference with a paired 95%
  interval;
- transformers backend, compact model: queries/s against the vLLM backend's, in fp32 and with `--int8` (its speed, and
  its accuracy against fp32 on the whole test set); its greedy loop against transformers' `generate` with the same
  grammar (the loop's own gain), bf16 weights and int8 on every Linear layer (speed, and accuracy against fp32);
- backend parity: the compact model's greedy test parses from both backends, compared;
- the read-normalise-dedupe step (`eval/labeling_prepare.py`), µs per row before and after.
Ends with one JSON line of every figure and ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python eval/bench_labeling.py` from a checkout
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

from querytune.machine import cpu_model  # noqa: E402


def child_vllm(args) -> None:
    """In the vLLM environment: parse the throughput queries (timed) and the test texts with one model."""
    from querytune.runtime.vllm_backend import VLLMBackend

    queries, tests = json.loads(Path(args.queries_file).read_text()), json.loads(Path(args.tests_file).read_text())
    t0 = time.perf_counter()
    backend = VLLMBackend(args.child_vllm, batch_size=256, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    result = {"load_s": load_s, "dtype": args.dtype}
    if queries:
        backend.parse(queries[:16])  # warm-up
        t0 = time.perf_counter()
        backend.parse(queries)
        result |= {"queries_per_s": len(queries) / (time.perf_counter() - t0)}
    result["test"] = [{"parse": p.parse, "raw": p.raw} for p in backend.parse(tests)]
    Path(args.out).write_text(json.dumps(result))


def run_vllm(model: Path, queries: Path | None, tests: Path, work: Path, dtype: str = "bfloat16") -> dict:
    """The vLLM backend in its own environment: queries/s on `queries` (when given) and the parses of `tests`."""
    from querytune.runtime.vllm_backend import vllm_env

    out = work / f"vllm_{model.name}_{dtype}.json"
    if queries is None:
        (queries := work / "none.json").write_text("[]")
    env = os.environ | vllm_env(VLLM_PYTHON.parents[1], kv_cache_gib=2)
    subprocess.run(
        [
            str(VLLM_PYTHON),
            __file__,
            "--child-vllm",
            str(model),
            "--queries-file",
            str(queries),
            "--tests-file",
            str(tests),
            "--out",
            str(out),
            "--dtype",
            dtype,
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())


def ensure_json_twin(compact: Path, twin: Path) -> None:
    """Train the JSON-format twin of the workspace's SFT model when it is missing: same data, steps, seed, preset."""
    if (twin / "summary.json").is_file():
        return
    config = json.loads((compact / "train_config.json").read_text())
    steps = json.loads((compact / "summary.json").read_text())["steps"]
    print(
        f"training the JSON-format twin of {compact} ({steps} steps, --format json) into {twin}: "
        "about 15-20 minutes on 2 cores",
        flush=True,
    )
    subprocess.run(
        [
            str(Path(sys.executable).parent / "querytune"),
            "train",
            "sft",
            "--data",
            config["data"],
            "--out",
            str(twin),
            "--preset",
            config["preset"],
            "--max-steps",
            str(steps),
            "--seed",
            str(config.get("seed", 0)),
            "--format",
            "json",
            "--max-minutes",
            "0",
        ],
        check=True,
    )


def timed_parse(parser, texts: list[str]) -> float:
    parser.parse(texts[:8])  # warm-up
    t0 = time.perf_counter()
    parser.parse(texts)
    return len(texts) / (time.perf_counter() - t0)


def generate_reference(parser, texts: list[str]) -> float:
    """queries/s of transformers' `generate` (the same grammar as a logits processor, scores kept): the decoding the
    greedy loop replaced."""
    import torch

    ids = [parser.tokenizer(p, add_special_tokens=False).input_ids for p in parser.prompts(texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = parser.tokenizer.pad_token_id
    t0 = time.perf_counter()
    for start in range(0, len(order), parser.batch_size):
        rows = [ids[i] for i in order[start : start + parser.batch_size]]
        width = max(map(len, rows))
        enc = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }
        with torch.inference_mode():
            out = parser.model.generate(
                **enc,
                max_new_tokens=parser.max_new_tokens,
                do_sample=False,
                eos_token_id=parser.tokenizer.eos_token_id,
                pad_token_id=pad,
                output_scores=True,
                return_dict_in_generate=True,
                **parser._constraint(width),
            )
            parser.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    return len(texts) / (time.perf_counter() - t0)


def accuracy(golds, preds_a, preds_b) -> dict:
    from querytune.evaluation.parse_eval import paired_parse_difference, parse_metrics

    a, b = parse_metrics(golds, preds_a), parse_metrics(golds, preds_b)
    diff = paired_parse_difference(golds, preds_a, preds_b)
    return {
        "a": {k: a[k] for k in ("intent_accuracy", "slot_f1", "validity")},
        "b": {k: b[k] for k in ("intent_accuracy", "slot_f1", "validity")},
        "b_minus_a": diff,
        "interval_includes_zero": all(d["low"] <= 0 <= d["high"] for d in diff.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    ap.add_argument(
        "--workspace", type=Path, default=ROOT / "workspace", help="what `make demo` left (default: ./workspace)"
    )
    ap.add_argument(
        "--json-model",
        type=Path,
        default=None,
        help="the JSON-format twin (default: WORKSPACE/models/sft_json, trained when missing)",
    )
    ap.add_argument(
        "--variants",
        type=Path,
        nargs="*",
        default=[],
        help="more model folders trained like models/sft in other formats (one lever each): "
        "vLLM queries/s and accuracy against the JSON twin",
    )
    ap.add_argument("--queries", type=int, default=1000, help="distinct log queries each throughput figure parses")
    ap.add_argument(
        "--lever-queries", type=int, default=300, help="queries for the transformers levers (generate, bf16, int8)"
    )
    ap.add_argument(
        "--lever-tests", type=int, default=400, help="test rows on which bf16 and int8 are checked against fp32"
    )
    ap.add_argument("--batch-size", type=int, default=64, help="queries per call of the transformers backend")
    ap.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads for the transformers backend"
    )
    ap.add_argument("--child-vllm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tests-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_vllm:
        return child_vllm(args)
    ws = args.workspace
    compact, world = ws / "models" / "sft", ws / "world"
    if not (compact / "querytune.json").is_file() or not (world / "test.jsonl").is_file():
        sys.exit(f"{ws}: no workspace here (models/sft, world/test.jsonl): run `make demo` first, or pass --workspace")
    import pandas as pd
    import torch

    from querytune.query import check_query
    from querytune.runtime.formats import folder_format
    from querytune.runtime.generate import Parser

    if folder_format(json.loads((compact / "querytune.json").read_text())) == "json":
        sys.exit(f"{compact} is a JSON-format model (trained before the compact format): retrain it with `make demo`")
    twin = args.json_model or ws / "models" / "sft_json"
    ensure_json_twin(compact, twin)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-labeling-"))
    log = pd.read_parquet(world / "log.parquet", columns=["query"])["query"]
    distinct = sorted({n for n, _ in map(check_query, log) if n})
    queries = random.Random(0).sample(distinct, min(args.queries, len(distinct)))
    rows = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    tests, golds = [r["text"] for r in rows], [{"intent": r["intent"], "slots": r["slots"]} for r in rows]
    (work / "queries.json").write_text(json.dumps(queries))
    (work / "tests.json").write_text(json.dumps(tests))
    result: dict = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "date": date.today().isoformat(),
        "queries": len(queries),
        "distinct_in_log": len(distinct),
        "log_rows": len(log),
        "test_rows": len(rows),
    }

    print(f"transformers backend, compact model, {len(queries)} queries, {args.threads} threads ...", flush=True)
    parser = Parser(compact, batch_size=args.batch_size, constrained=True)
    result["transformers_compact_qps"] = round(timed_parse(parser, queries), 2)
    t_test = parser.parse(tests)
    levers = queries[: args.lever_queries]
    print(f"transformers levers on {len(levers)} queries: the greedy loop, generate, bf16, int8 ...", flush=True)
    loop_qps = timed_parse(parser, levers)
    result["transformers_levers"] = {
        "greedy_loop_qps": round(loop_qps, 2),
        "generate_qps": round(generate_reference(parser, levers), 2),
    }
    fp32_test = [p.parse for p in t_test[: args.lever_tests]]

    def every_linear_int8(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)

    for name, convert in {"bf16": lambda m: m.to(torch.bfloat16), "int8_every_linear": every_linear_int8}.items():
        variant = Parser(compact, batch_size=args.batch_size, constrained=True)
        variant.model = convert(variant.model)
        qps = timed_parse(variant, levers)
        acc = accuracy(
            golds[: args.lever_tests], fp32_test, [p.parse for p in variant.parse(tests[: args.lever_tests])]
        )
        result["transformers_levers"][name] = {
            "qps": round(qps, 2),
            "vs_fp32": round(qps / loop_qps, 2),
            "accuracy_vs_fp32": acc,
        }
        del variant
    result["transformers_levers"]["loop_vs_generate"] = round(
        loop_qps / result["transformers_levers"]["generate_qps"], 2
    )
    del parser
    print(
        "transformers backend --int8 (querytune.runtime.generate.quantize_int8), "
        f"{len(queries)} queries and the whole test set ...",
        flush=True,
    )
    int8 = Parser(compact, batch_size=args.batch_size, constrained=True, int8=True)
    result["transformers_int8_qps"] = round(timed_parse(int8, queries), 2)
    result["transformers_int8_vs_fp32"] = round(result["transformers_int8_qps"] / result["transformers_compact_qps"], 2)
    result["accuracy_fp32_to_int8"] = accuracy(golds, [p.parse for p in t_test], [p.parse for p in int8.parse(tests)])
    del int8

    if VLLM_PYTHON.is_file():
        print(f"vLLM backend ({VLLM_PYTHON}, bf16): the compact model, then the JSON twin ...", flush=True)
        v_compact = run_vllm(compact, work / "queries.json", work / "tests.json", work)
        v_json = run_vllm(twin, work / "queries.json", work / "tests.json", work)
        for variant in args.variants:
            print(f"vLLM backend, bf16: variant {variant} ...", flush=True)
            v = run_vllm(variant, work / "queries.json", work / "tests.json", work)
            result.setdefault("variants", {})[str(variant)] = {
                "format": folder_format(json.loads((variant / "querytune.json").read_text())),
                "vllm_qps": round(v["queries_per_s"], 2),
                "vs_json_vllm": round(v["queries_per_s"] / v_json["queries_per_s"], 2),
                "accuracy_json_to_variant": accuracy(
                    golds, [p["parse"] for p in v_json["test"]], [p["parse"] for p in v["test"]]
                ),
            }
        print(
            "vLLM backend, float32 (as the transformers backend decodes): the compact model's test parses ...",
            flush=True,
        )
        v_parity = run_vllm(compact, None, work / "tests.json", work, dtype="float32")
        result["vllm_compact_qps"], result["vllm_json_qps"] = (
            round(v_compact["queries_per_s"], 2),
            round(v_json["queries_per_s"], 2),
        )
        result["compact_vs_json_vllm"] = round(v_compact["queries_per_s"] / v_json["queries_per_s"], 2)
        result["transformers_vs_vllm"] = round(result["transformers_compact_qps"] / v_compact["queries_per_s"], 2)
        result["transformers_int8_vs_vllm"] = round(result["transformers_int8_qps"] / v_compact["queries_per_s"], 2)
        result["accuracy_json_to_compact"] = accuracy(
            golds, [p["parse"] for p in v_json["test"]], [p["parse"] for p in v_compact["test"]]
        )
        for name, run in {
            "parity": v_parity,
            "parity_bf16": v_compact,
        }.items():  # both backends fp32; vLLM bf16 against fp32
            same = [p.parse == v["parse"] for p, v in zip(t_test, run["test"])]
            result[f"{name}_same_parse"], result[f"{name}_rows"] = sum(same), len(same)
        result["parity_differs"] = [
            {"text": t, "transformers": p.raw, "vllm": v["raw"]}
            for t, p, v in zip(tests, t_test, v_parity["test"])
            if p.parse != v["parse"]
        ][:20]
    else:
        print(
            f"no vLLM environment ({VLLM_PYTHON}; `make vllm-env` builds it): the vLLM figures are left out", flush=True
        )
    try:
        sys.path.insert(0, str(ROOT / "eval"))
        from labeling_prepare import prepare_figures

        result["prepare"] = prepare_figures(str(world / "log.parquet"))
    except ImportError:
        pass

    for key in (
        "vllm_compact_qps",
        "vllm_json_qps",
        "compact_vs_json_vllm",
        "transformers_compact_qps",
        "transformers_vs_vllm",
        "transformers_int8_qps",
        "transformers_int8_vs_vllm",
    ):
        if key in result:
            print(f"{key:<28}{result[key]:>10}")
    if "accuracy_json_to_compact" in result:
        a = result["accuracy_json_to_compact"]
        print(
            f"compact - json (vLLM, test): intent {a['b_minus_a']['intent_accuracy']}, "
            f"slot F1 {a['b_minus_a']['slot_f1']}"
        )
        print(f"parity: {result['parity_same_parse']} / {result['parity_rows']} test parses the same on both backends")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
