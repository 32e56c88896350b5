"""Fuzzed input files against the schema loader and the labeler's reader: no bad file or row may end in a traceback.

    python eval/fuzz_files.py [--n 10000] [--seed 0] [--keep runs/fuzz]

Half the files are schema files, mutations of data/schema.yaml and data/schemas/sgd.yaml (a value of another type, a
deleted field, deep nesting, a 5,000-digit number, a lone surrogate, bytes that are not UTF-8, a cut, an alias bomb,
odd YAML scalars, random bytes, a document that is not a mapping), each given to `load_schema`: it must load (and
give a version and a JSON schema) or raise a SchemaError that names the file. The other half are query logs (CSV,
JSONL, Parquet) of good rows mixed with junk rows of known lines, given to
`querytune.labeling.log_input.account_rows` and `save_accounting` (what `querytune label` does before the model):
each junk row must be a reject with its file and line, each good row accepted, and a file that cannot be read at all
may only raise LabelInputError. Prints counts per mutation kind and a last line of JSON; exits 1 if anything else was
raised or a row was misplaced. The files are written under a temporary folder (`--keep DIR` keeps them, with the
failing ones listed in DIR/failures.jsonl).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/fuzz_files.py` from a checkout

from querytune.labeling.label import save_accounting  # noqa: E402
from querytune.labeling.log_input import LabelInputError, account_rows  # noqa: E402
from querytune.schema import SchemaError  # noqa: E402
from querytune.schema_file import load_schema  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = [REPO / "data" / "schema.yaml", REPO / "data" / "schemas" / "sgd.yaml"]
HOLE = "HOLEZQXJ"  # a plain YAML scalar no schema holds: where a raw YAML snippet goes
WORDS = (
    "cheap thai pizza near me open now dentist saturday barber plumber 24h sushi brooklyn austin kid friendly vegan"
).split()


# ---- schema files -------------------------------------------------------------------------------------------------


def _paths(tree, path=()):
    """Every (path, node) of a YAML tree, the root first."""
    yield path, tree
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield from _paths(v, path + (k,))


def _set(tree, path, value):
    if not path:
        return value
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return tree


def _delete(tree, path):
    node = tree
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    return tree


def _with_snippet(rng, tree, snippet: str) -> bytes:
    """The tree dumped as YAML with a raw snippet in place of a random node (or appended as a top-level field)."""
    paths = [p for p, _ in _paths(tree) if p]
    tree = _set(tree, rng.choice(paths), HOLE)
    return (
        yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=10_000)
        .replace(HOLE, snippet, 1)
        .encode("utf-8")
    )


def _other_type(rng, value):
    choices = [
        7,
        -1.5,
        True,
        None,
        "",
        "x" * rng.choice([1, 300]),
        [],
        ["a", 1],
        {},
        {"k": [1, {"z": None}]},
        1e308,
        "2001-01-01",
    ]
    return rng.choice([c for c in choices if type(c) is not type(value)])


def schema_file(rng: random.Random, kind: str) -> bytes:
    base = rng.choice(SCHEMAS)
    text = base.read_bytes()
    tree = yaml.safe_load(text)
    paths = [p for p, _ in _paths(tree) if p]
    if kind == "type_swap":
        for _ in range(rng.randint(1, 3)):
            path = rng.choice([p for p, _ in _paths(tree) if p])
            node = tree
            for k in path:
                node = node[k]
            tree = _set(tree, path, _other_type(rng, node))
        return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode("utf-8")
    if kind == "deletion":
        for _ in range(rng.randint(1, 4)):
            paths = [p for p, _ in _paths(tree) if p]
            tree = _delete(tree, rng.choice(paths))
        return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode("utf-8")
    if kind == "deep_nesting":
        depth = rng.choice([50, 500, 990, 5_000, 50_000])
        open_, close = rng.choice([("[", "]"), ("{a: ", "}")])
        return _with_snippet(rng, tree, open_ * depth + "1" + close * depth)
    if kind == "huge_number":
        return _with_snippet(
            rng,
            tree,
            rng.choice(["9" * rng.choice([4301, 5000, 100_000]), "-0x" + "f" * 5000, "1e99999", "0" + "7" * 20_000]),
        )
    if kind == "surrogate":
        return _with_snippet(rng, tree, rng.choice(['"\\ud800"', '"caf\\udce9"', '"ok \\udfff end"']))
    if kind == "invalid_utf8":
        data = bytearray(text)
        for _ in range(rng.randint(1, 5)):
            data.insert(rng.randrange(len(data)), rng.choice([0x80, 0xC3, 0xE9, 0xED, 0xFF]))
        return bytes(data) if rng.random() < 0.5 else bytes(data).replace(b"find", b"\xed\xa0\x80find", 1)
    if kind == "truncation":
        return text[: rng.randrange(len(text))]
    if kind == "yaml_bomb":  # billion laughs, defined where it is used: 9**levels leaves from a few hundred bytes
        bomb = "&b0 [lol]"
        for i in range(1, rng.choice([6, 9, 12])):
            bomb = f"&b{i} [{bomb}, {', '.join([f'*b{i - 1}'] * 8)}]"
        return _with_snippet(rng, tree, bomb)
    if kind == "odd_scalar":
        return _with_snippet(
            rng,
            tree,
            rng.choice(
                [
                    "2001-13-45",
                    "2001-02-30 25:61:00",
                    "!!binary 'zz=='",
                    "!!python/object:os.system x",
                    "!!float abc",
                    "!!int 1.5",
                    ".nan",
                    "~",
                    "&a [*a]",
                    "*nowhere",
                    "!!set {a, b}",
                    "!!timestamp 2001-99-01",
                    "<<: 1",
                    "? [a, b]\n  : c",
                ]
            ),
        )
    if kind == "binary_junk":
        return bytes(rng.randrange(256) for _ in range(rng.choice([1, 64, 4096])))
    if kind == "not_a_mapping":
        return rng.choice(
            [
                b"",
                b"- a\n- b\n",
                b"42\n",
                b"'just text'\n",
                b"null\n",
                b"---\n...\n",
                b"[intents, slots]\n",
                b"a: 1\n---\nb: 2\n",
            ]
        )
    raise ValueError(kind)


SCHEMA_KINDS = [
    "type_swap",
    "deletion",
    "deep_nesting",
    "huge_number",
    "surrogate",
    "invalid_utf8",
    "truncation",
    "yaml_bomb",
    "odd_scalar",
    "binary_junk",
    "not_a_mapping",
]


def check_schema(path: Path) -> tuple[str, str | None]:
    """('loaded' | 'rejected' | 'unhandled' | 'misnamed', detail)."""
    try:
        schema = load_schema(path)
        schema.version, schema.json_schema()  # a loaded schema must be usable: hashed, turned into a JSON schema
        return "loaded", None
    except SchemaError as e:
        return ("rejected", None) if str(e).startswith(str(path)) else ("misnamed", str(e)[:300])
    except BaseException as e:  # noqa: BLE001 - what this script counts
        if isinstance(e, KeyboardInterrupt):
            raise
        return "unhandled", "".join(traceback.format_exception_only(type(e), e)).strip()[:300] + " @ " + _where(e)


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


# ---- query logs ---------------------------------------------------------------------------------------------------

JSONL_JUNK = [
    "surrogate",
    "huge_number",
    "invalid_utf8",
    "deep_nesting",
    "broken_json",
    "not_text",
    "missing_field",
    "empty",
    "too_long",
    "control_chars",
    "not_an_object",
]
CSV_JUNK = [
    "invalid_utf8",
    "encoded_surrogate",
    "empty",
    "too_long",
    "huge_field",
    "control_chars",
    "nul",
    "extra_fields",
    "huge_number_text",
]
PARQUET_JUNK = ["invalid_utf8", "encoded_surrogate", "null", "empty", "too_long", "control_chars"]


def _good(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def jsonl_line(rng, kind: str | None) -> bytes:
    if kind is None:
        return json.dumps({"query": _good(rng), "n": rng.randint(0, 9)}).encode()
    return {
        "surrogate": lambda: b'{"query": "' + rng.choice([b"\\ud800", b"\\udfff x", b"thai \\udce9"]) + b'"}',
        "huge_number": lambda: b'{"query": "thai", "n": ' + b"9" * rng.choice([4301, 5000, 50_000]) + b"}",
        "invalid_utf8": lambda: (
            b'{"query": "caf' + rng.choice([b"\xe9", b"\xff", b"\xed\xa0\x80", b"\xc3"]) + b' latte"}'
        ),
        "deep_nesting": lambda: b'{"query": ' + b"[" * rng.choice([2_000, 100_000]) + b"}",
        "broken_json": lambda: rng.choice([b'{"query": "thai"', b"{query: thai}", b'{"query": "a" "b"}', b"NaN x"]),
        "not_text": lambda: json.dumps({"query": rng.choice([7, 1.5, True, None, ["a"], {"a": "b"}])}).encode(),
        "missing_field": lambda: json.dumps({"q": "thai"}).encode(),
        "empty": lambda: json.dumps({"query": rng.choice(["", "   ", "\u00a0\t"])}).encode(),
        "too_long": lambda: json.dumps({"query": "pizza " * rng.choice([60, 2000])}).encode(),
        "control_chars": lambda: json.dumps({"query": "thai\x01food"}).encode(),
        "not_an_object": lambda: rng.choice([b"[1, 2]", b"42", b"null"]),
    }[kind]()


def csv_line(rng, kind: str | None) -> bytes:
    if kind is None:
        return f"{_good(rng)},{rng.randint(0, 9)}".encode()
    return {
        "invalid_utf8": lambda: b"caf" + rng.choice([b"\xe9", b"\xff", b"\xc3"]) + b" latte,1",
        "encoded_surrogate": lambda: b"thai \xed\xa0\x80,1",
        "empty": lambda: rng.choice([b",1", b"   ,1", b'"",1']),
        "too_long": lambda: b"pizza " * 100 + b",1",
        "huge_field": lambda: b'"' + b"x" * 200_000 + b'",1',
        "control_chars": lambda: b"thai\x02food,1",
        "nul": lambda: b"thai\x00food,1",
        "extra_fields": lambda: b"thai,1,2",
        "huge_number_text": lambda: b"9" * 5000 + b",1",
    }[kind]()


def parquet_cell(rng, kind: str | None) -> bytes | None:
    if kind is None:
        return _good(rng).encode()
    return {
        "invalid_utf8": lambda: b"caf\xe9",
        "encoded_surrogate": lambda: b"x\xed\xa0\x80",
        "null": lambda: None,
        "empty": lambda: b"  ",
        "too_long": lambda: b"sushi " * 100,
        "control_chars": lambda: b"a\x03b",
    }[kind]()


def log_file(rng: random.Random, folder: Path, i: int) -> tuple[Path, str, set[int], set[int], str]:
    """A log file: (path, format, good lines, bad lines, file-level mutation). Lines are what rejects name (JSONL and
    CSV: physical line, header = 1; Parquet: 1-based row)."""
    fmt = rng.choice(["jsonl", "csv", "parquet"])
    junk = {"jsonl": JSONL_JUNK, "csv": CSV_JUNK, "parquet": PARQUET_JUNK}[fmt]
    kinds = [rng.choice(junk) if rng.random() < 0.3 else None for _ in range(rng.randint(5, 40))]
    path = folder / f"log{i:05d}.{fmt}"
    mutation = "none" if rng.random() < 0.8 else rng.choice(["truncation", "zero_bytes", "binary_junk"])
    good, bad = set(), set()
    if fmt == "parquet":
        cells = [parquet_cell(rng, k) for k in kinds]
        pq.write_table(
            pa.table({"query": pa.array(cells, pa.binary()).view(pa.string())}), path
        )  # no UTF-8 check, like a careless writer
        for n, k in enumerate(kinds, 1):
            (bad if k else good).add(n)
        data = path.read_bytes()
    else:
        line = jsonl_line if fmt == "jsonl" else csv_line
        lines = [b"query,n"] if fmt == "csv" else []
        for k in kinds:
            lines.append(line(rng, k))
            (bad if k else good).add(len(lines))
        data = b"\n".join(lines) + b"\n"
    if mutation == "truncation":
        data = data[: rng.randrange(len(data))]
    elif mutation == "zero_bytes":
        data = b""
    elif mutation == "binary_junk":
        data = bytes(rng.randrange(256) for _ in range(rng.choice([16, 512])))
    path.write_bytes(data)
    return path, fmt, good, bad, mutation


def check_log(path: Path, good: set[int], bad: set[int], mutation: str, scratch: Path) -> tuple[str, str | None]:
    """('ok' | 'input_error' | 'unhandled' | 'misplaced', detail). A cut or junk file can only be held to: every
    row accounted for once, no traceback."""
    try:
        acc = account_rows(path)
        save_accounting(acc, scratch)
    except LabelInputError as e:
        return (
            ("input_error", None)
            if str(e).startswith(str(path))
            else ("misplaced", f"error does not name the file: {e}")
        )
    except BaseException as e:  # noqa: BLE001 - what this script counts
        if isinstance(e, KeyboardInterrupt):
            raise
        return "unhandled", "".join(traceback.format_exception_only(type(e), e)).strip()[:300] + " @ " + _where(e)
    rejected = [(r["source"], r["line"]) for r in acc.rejects]
    accepted = list(zip(acc.mapping["source"], acc.mapping["line"]))
    if len(set(rejected + accepted)) != len(rejected) + len(accepted) or acc.rows != len(rejected) + len(accepted):
        return "misplaced", "a row counted twice"
    if {s for s, _ in rejected + accepted} - {path.name}:
        return "misplaced", "a row names another file"
    if mutation == "none" and ({n for _, n in rejected} != bad or {n for _, n in accepted} != good):
        return "misplaced", f"bad lines {sorted(bad)} but rejected {sorted(n for _, n in rejected)}"
    return "ok", None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="files in all, half schema files, half query logs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--keep", type=Path, default=None, help="write the files here and keep them (default: a temporary folder)"
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="fuzz_files_"))
    (root / "schemas").mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    schema_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    log_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    row_counts: collections.Counter = collections.Counter()
    failures = []
    for i in range(args.n):
        if i % 2 == 0:
            kind = SCHEMA_KINDS[(i // 2) % len(SCHEMA_KINDS)]
            path = root / "schemas" / f"schema{i:05d}.yaml"
            path.write_bytes(schema_file(rng, kind))
            outcome, detail = check_schema(path)
            schema_counts[kind][outcome] += 1
        else:
            path, fmt, good, bad, mutation = log_file(rng, root / "logs", i)
            kind = f"{fmt}/{mutation}"
            outcome, detail = check_log(path, good, bad, mutation, scratch)
            log_counts[kind][outcome] += 1
            if mutation == "none":
                row_counts["bad_rows"] += len(bad)
                row_counts["good_rows"] += len(good)
                if outcome == "ok":
                    row_counts["bad_rows_rejected_with_file_and_line"] += len(bad)
        if outcome in ("unhandled", "misnamed", "misplaced"):
            failures.append({"file": str(path), "kind": kind, "outcome": outcome, "detail": detail})
        if detail and outcome == "unhandled" and len(failures) <= 20:
            print(f"  {outcome}: {kind} {path.name}: {detail}", file=sys.stderr)
    seconds = time.perf_counter() - t0

    print(f"{'schema mutation':<16} {'files':>6} {'loaded':>7} {'rejected':>9} {'unhandled':>10} {'misnamed':>9}")
    for kind in SCHEMA_KINDS:
        c = schema_counts[kind]
        print(
            f"{kind:<16} {sum(c.values()):>6} {c['loaded']:>7} {c['rejected']:>9}"
            f" {c['unhandled']:>10} {c['misnamed']:>9}"
        )
    print(f"\n{'log (format/file)':<22} {'files':>6} {'ok':>6} {'input_error':>12} {'unhandled':>10} {'misplaced':>10}")
    for kind in sorted(log_counts):
        c = log_counts[kind]
        print(
            f"{kind:<22} {sum(c.values()):>6} {c['ok']:>6} {c['input_error']:>12}"
            f" {c['unhandled']:>10} {c['misplaced']:>10}"
        )
    if args.keep:
        (root / "failures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failures))
    else:
        shutil.rmtree(root, ignore_errors=True)
    total = lambda counts, key: sum(c[key] for c in counts.values())  # noqa: E731
    summary = {
        "files": args.n,
        "seed": args.seed,
        "schema_files": sum(sum(c.values()) for c in schema_counts.values()),
        "schema_loaded": total(schema_counts, "loaded"),
        "schema_rejected": total(schema_counts, "rejected"),
        "log_files": sum(sum(c.values()) for c in log_counts.values()),
        "log_input_errors": total(log_counts, "input_error"),
        **row_counts,
        "unhandled": total(schema_counts, "unhandled") + total(log_counts, "unhandled"),
        "misnamed": total(schema_counts, "misnamed"),
        "misplaced": total(log_counts, "misplaced"),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(summary))
    sys.exit(1 if summary["unhandled"] or summary["misnamed"] or summary["misplaced"] else 0)


if __name__ == "__main__":
    main()
