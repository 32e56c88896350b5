"""Kill `querytune label` with SIGKILL again and again, damage its shards, start a second run beside it: every row
must still end up labeled exactly once or rejected exactly once.

    python eval/kill_label.py [--kills 20] [--rows 3000] [--seed 0] [--keep runs/kill_label]

Builds the tests' small world and tiny model (querytune.testing), writes its first
`--rows` log queries as three files (CSV, JSONL, Parquet) with bad rows among them (lone surrogates, bytes that are
not UTF-8, 5,000-digit numbers, JSON nested too deep, a CSV field past the csv module's limit, empty, too long), then
runs `querytune label` on them `--kills` times, each killed with SIGKILL at a random moment: half a random time after
the start (loading, reading, writing rows.parquet), half just after a new shard appears (mid-labeling). Along the way
it tears one shard (cuts its end), empties another (zero bytes), and starts a second run while one is labeling (it
must be refused at once, exit 2). A last run finishes; then every input row must be in rows.parquet (accepted) or
rejects.jsonl (bad) exactly once, on its file and line, and each distinct normalised query in exactly one shard.
Prints one line per kill and a last line of JSON; exits 1 if a row is lost or duplicated. Work goes to a temporary
folder (`--keep DIR` keeps it). About 5 minutes on 2 cores, mostly process starts.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/kill_label.py` from a checkout

from querytune.labeling.label import read_labels  # noqa: E402
from querytune.schema import normalize_text  # noqa: E402

SMALL = {"seed": 0, "rows": 4000, "per_city": 60}  # the tests' small world (tests/conftest.py)


def write_log(world: Path, folder: Path, rows: int, rng: random.Random) -> tuple[dict, dict]:
    """Three log files of the world's first `rows` queries with bad rows mixed in. Returns ({(file, line): normalised
    query} for the good rows, {(file, line): kind} for the bad)."""
    queries = pd.read_parquet(world / "log.parquet", columns=["query"])["query"].head(rows).tolist()
    third = len(queries) // 3
    parts = {"a.csv": queries[:third], "b.jsonl": queries[third : 2 * third], "c.parquet": queries[2 * third :]}
    bad_rows = {
        "a.csv": {
            "invalid_utf8": b"caf\xe9 latte",
            "encoded_surrogate": b"thai \xed\xa0\x80",
            "empty": b'""',
            "too_long": b"pizza " * 60,
            "huge_field": b'"' + b"x" * 200_000 + b'"',
            "huge_number": b"9" * 5000,
        },
        "b.jsonl": {
            "surrogate": b'{"query": "\\ud800 tacos"}',
            "huge_number": b'{"query": ' + b"9" * 5000 + b"}",
            "huge_number_other_field": b'{"query": "thai", "n": ' + b"9" * 5000 + b"}",
            "invalid_utf8": b'{"query": "caf\xff"}',
            "deep_nesting": b'{"query": ' + b"[" * 100_000 + b"}",
            "empty": b'{"query": "  "}',
            "too_long": json.dumps({"query": "y" * 300}).encode(),
        },
        "c.parquet": {"invalid_utf8": b"caf\xe9", "null": None, "empty": b" ", "too_long": b"sushi " * 60},
    }
    good, bad = {}, {}
    folder.mkdir(parents=True)
    for name, texts in parts.items():
        cells: list[tuple[str | None, bytes | None]] = [(None, t) for t in texts]
        for kind, raw in bad_rows[name].items():
            for _ in range(3):
                cells.insert(rng.randrange(len(cells) + 1), (kind, raw))
        first = 2 if name.endswith(".csv") else 1  # the CSV header is line 1
        for n, (kind, cell) in enumerate(cells, first):
            if kind:
                bad[(name, n)] = kind
            else:
                good[(name, n)] = normalize_text(cell)
        if name.endswith(".csv"):
            lines = [b"query"]
            for kind, cell in cells:
                if kind:
                    lines.append(cell)
                else:
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="").writerow([cell])
                    lines.append(buf.getvalue().encode())
            (folder / name).write_bytes(b"\n".join(lines) + b"\n")
        elif name.endswith(".jsonl"):
            lines = [cell if kind else json.dumps({"query": cell}).encode() for kind, cell in cells]
            (folder / name).write_bytes(b"\n".join(lines) + b"\n")
        else:
            raw = [cell if kind else cell.encode() for kind, cell in cells]
            pq.write_table(
                pa.table({"query": pa.array(raw, pa.binary()).view(pa.string())}), folder / name
            )  # no UTF-8 check
    return good, bad


def shards(out: Path) -> list[Path]:
    return sorted((out / "labels").glob("part-*.parquet"))


def start(cmd: list[str], err: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the run's whole process group; False if it had already ended."""
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def wait_for_new_shard(proc: subprocess.Popen, out: Path, before: int, limit: float = 120) -> bool:
    deadline = time.time() + limit
    while proc.poll() is None and time.time() < deadline:
        if len(shards(out)) > before:
            return True
        time.sleep(0.02)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument(
        "--rows", type=int, default=4000, help="log queries, at most the small world's 4,000 (bad rows come on top)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="kill_label_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from querytune.testing import tiny_world_and_model

    world, model = tiny_world_and_model(root / "build", SMALL["rows"], SMALL["per_city"])
    good, bad = write_log(world, root / "log", args.rows, rng)
    out = root / "out"
    cmd = [
        str(Path(sys.executable).parent / "querytune"),
        "label",
        str(root / "log"),
        "--model",
        str(model),
        "--out",
        str(out),
        "--shard-size",
        "32",
        "--batch-size",
        "16",
    ]
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, "-c", "from querytune.cli import app; app()"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update(env)
    print(
        f"log: {len(good) + len(bad)} rows ({len(bad)} bad, {len(set(good.values()))} distinct queries); model {model}",
        flush=True,
    )

    stats = {
        "kills": 0,
        "killed_mid_labeling": 0,
        "ended_before_kill": 0,
        "torn_shards": 0,
        "zero_byte_shards": 0,
        "concurrent_refused": 0,
        "concurrent_not_refused": 0,
        "concurrent_inconclusive": 0,
    }
    torn_at, zero_at, concurrent_at = args.kills // 4, args.kills // 2, (3 * args.kills) // 4
    damaged: set[str] = set()
    k = -1
    while stats["kills"] < args.kills:  # attempts go on until that many kills have landed on a running labeler
        k += 1
        if stats["ended_before_kill"] > 2 * args.kills:
            print(
                f"only {stats['kills']} kills landed before the log was all labeled: give a larger --rows",
                file=sys.stderr,
            )
            sys.exit(1)
        before = len(shards(out)) if out.exists() else 0
        proc = start(cmd, root / f"run{k:02d}.err")
        mid = k % 2 == 1
        if mid:  # just after a shard lands: mid-labeling
            wait_for_new_shard(proc, out, before)
            time.sleep(rng.uniform(0, 1.5))
        else:  # anywhere from the start: loading, reading the log, writing rows.parquet, labeling
            time.sleep(rng.uniform(0.2, 8))
        checked = stats["concurrent_refused"] + stats["concurrent_not_refused"]
        if stats["kills"] >= concurrent_at and not checked and proc.poll() is None:
            wait_for_new_shard(proc, out, len(shards(out)))  # the first run holds the lock and is labeling
            t = time.perf_counter()
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            refused = (
                second.returncode == 2
                and "another run" in second.stderr
                and len(second.stderr.strip().splitlines()) == 1
            )
            if refused or proc.poll() is None:
                stats["concurrent_refused" if refused else "concurrent_not_refused"] += 1
            else:  # the first run had finished: nothing to refuse (a log too small for this check)
                stats["concurrent_inconclusive"] += 1
            print(
                f"  second run beside a labeling one: exit {second.returncode} in {time.perf_counter() - t:.1f}s: "
                f"{second.stderr.strip()[-160:]}"
            )
        killed = kill(proc)
        stats["kills"] += killed
        stats["killed_mid_labeling"] += killed and mid
        stats["ended_before_kill"] += not killed
        now = shards(out) if out.exists() else []
        whole = [p for p in now if p.name not in damaged]  # a damaged shard the next run has not set aside yet
        note = ""
        if k >= torn_at and not stats["torn_shards"] and whole:
            victim = rng.choice(whole)
            victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 2)])
            stats["torn_shards"] += 1
            damaged.add(victim.name)
            note = f"; tore {victim.name}"
        elif k >= zero_at and not stats["zero_byte_shards"] and whole:
            victim = rng.choice(whole)
            victim.write_bytes(b"")
            stats["zero_byte_shards"] += 1
            damaged.add(victim.name)
            note = f"; emptied {victim.name}"
        print(
            f"kill {stats['kills']:2d}/{args.kills}, attempt {k + 1} ({'mid-labeling' if mid else 'random time'}): "
            f"{'killed' if killed else 'had ended'}, "
            f"{len(now)} shards{note}",
            flush=True,
        )

    final = subprocess.run(cmd, capture_output=True, text=True)
    if final.returncode != 0:
        print(final.stderr[-2000:], file=sys.stderr)
        sys.exit(1)
    summary = json.loads(final.stdout.strip().splitlines()[-1])

    rows = pd.read_parquet(out / "rows.parquet")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    labels = read_labels(out)
    accepted = list(zip(rows["source"], rows["line"]))
    rejected = [(r["source"], r["line"]) for r in rejects]
    keys = accepted + rejected
    expected = set(good) | set(bad)
    wrong_norm = sum(good.get(key) != norm for key, norm in zip(accepted, rows["normalized"]))
    check = {
        "rows_in": len(expected),
        "accepted": len(accepted),
        "rejected": len(rejected),
        "rows_lost": len(expected - set(keys)),
        "rows_duplicated": len(keys) - len(set(keys)),
        "rows_unknown": len(set(keys) - expected),
        "good_rows_rejected": len(set(rejected) & set(good)),
        "bad_rows_accepted": len(set(accepted) & set(bad)),
        "rows_with_wrong_query": wrong_norm,
        "distinct": summary["distinct"],
        "labels": len(labels),
        "labels_duplicated": int(labels["normalized"].duplicated().sum()),
        "queries_without_label": len(set(rows["normalized"]) - set(labels["normalized"])),
        "labels_without_row": len(set(labels["normalized"]) - set(rows["normalized"])),
        "shards_set_aside": len(list((out / "labels").glob("*.corrupt"))),
    }
    failed = any(
        check[k]
        for k in (
            "rows_lost",
            "rows_duplicated",
            "rows_unknown",
            "good_rows_rejected",
            "bad_rows_accepted",
            "rows_with_wrong_query",
            "labels_duplicated",
            "queries_without_label",
            "labels_without_row",
        )
    )
    failed = (
        failed
        or stats["concurrent_not_refused"] > 0
        or check["shards_set_aside"] != stats["torn_shards"] + stats["zero_byte_shards"]
    )
    failed = failed or not (
        stats["concurrent_refused"] or stats["concurrent_inconclusive"]
    )  # the lock was never put to the test
    result = {**stats, **check, "ok": not failed, "seconds": round(time.perf_counter() - t0, 1)}
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
