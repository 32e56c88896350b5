"""The labeler's read-normalise-dedupe step, per-row Python against Arrow: driver time per row and peak memory.

    python eval/labeling_prepare.py [--log runs/w0/log.parquet] [--rows N] [--replicate-to 1200000]

Times `querytune.labeling.log_input.account_rows` + `save_accounting` (the per-row Python definition) and
`querytune.labeling.log_prepare.prepare` (Arrow, a batch at a time), wall and CPU time (all threads) per row, on the
same input: the world's log (its first `--rows` rows), and that log repeated to about `--replicate-to` rows so per-row
costs show over start-up. Each run is a fresh Python process, so its peak RSS growth (ru_maxrss after the step less
before it) is its own; Arrow runs once more on 5 times as many rows (its memory must stay flat). CPU time is the
steadier figure on a shared machine. Also the distinct share (distinct normalised queries / rows) at growing prefixes of
the log: it falls as the log grows. Prints the figures as one JSON line; `prepare_figures(log_path, rows)` returns them
(eval/bench_labeling.py calls it). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/labeling_prepare.py` from a checkout

from querytune.machine import cpu_model  # noqa: E402


def _measure(path: str, way: str, out: str) -> dict:
    """One run of one way on `path` in this process: seconds and peak RSS growth."""
    from querytune.labeling.label import save_accounting
    from querytune.labeling.log_input import account_rows
    from querytune.labeling.log_prepare import prepare

    start = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if way == "python":
        acc = account_rows(path)
        save_accounting(acc, Path(out))
        rows, distinct = acc.rows, len(acc.first_spelling)
    else:
        prep = prepare(path, out)
        rows, distinct = prep.rows, prep.distinct.num_rows
    seconds, end = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime  # all threads: what the step costs in cores
    return {
        "rows": rows,
        "distinct": distinct,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_growth_mb": (end.ru_maxrss - start.ru_maxrss) / 1024,
    }  # KiB on Linux


def _run(path: Path, way: str, work: Path) -> dict:
    out = work / f"out-{way}-{path.stem}"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, __file__, "--measure", way, str(path), str(out)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(path: Path, work: Path) -> dict:
    py, arrow = _run(path, "python", work), _run(path, "arrow", work)
    assert (py["rows"], py["distinct"]) == (arrow["rows"], arrow["distinct"]), (py, arrow)
    return {
        "rows": py["rows"],
        "distinct": py["distinct"],
        "python_us_per_row": round(1e6 * py["seconds"] / py["rows"], 3),
        "arrow_us_per_row": round(1e6 * arrow["seconds"] / arrow["rows"], 3),
        "speedup": round(py["seconds"] / arrow["seconds"], 1),
        "cpu_speedup": round(py["cpu_seconds"] / arrow["cpu_seconds"], 1),
        "python_cpu_us_per_row": round(1e6 * py["cpu_seconds"] / py["rows"], 3),
        "arrow_cpu_us_per_row": round(1e6 * arrow["cpu_seconds"] / arrow["rows"], 3),
        "python_peak_rss_growth_mb": round(py["peak_rss_growth_mb"], 1),
        "arrow_peak_rss_growth_mb": round(arrow["peak_rss_growth_mb"], 1),
    }


def prepare_figures(log_path: str, rows: int | None = None, replicate_to: int = 1_200_000) -> dict:
    """Per-row driver time and peak RSS growth of both ways on the log (its first `rows`) and on the log repeated to
    about `replicate_to` rows; the distinct share at growing prefixes of the log."""
    from querytune.labeling.log_prepare import prepare

    queries = pq.read_table(log_path, columns=["query"])
    if rows:
        queries = queries.slice(0, rows)
    with tempfile.TemporaryDirectory(prefix="labeling-prepare-") as tmp:
        work = Path(tmp)
        pq.write_table(queries, work / "log.parquet")
        copies = max(1, math.ceil(replicate_to / queries.num_rows))
        pq.write_table(pa.concat_tables([queries] * copies), work / "replicated.parquet")
        log, replicated = _compare(work / "log.parquet", work), _compare(work / "replicated.parquet", work)
        pq.write_table(
            pa.concat_tables([queries] * copies * 5), work / "replicated5.parquet"
        )  # Arrow's memory must not grow with rows
        arrow5 = _run(work / "replicated5.parquet", "arrow", work)
        (work / "share").mkdir()
        prepare(work / "log.parquet", work / "share")
        normalized = pq.read_table(work / "share" / "rows.parquet", columns=["normalized"])["normalized"]
    prefixes = sorted(
        {n for n in (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000) if n < len(normalized)}
        | {len(normalized)}
    )
    share = {str(n): round(pc.count_distinct(normalized.slice(0, n)).as_py() / n, 4) for n in prefixes}
    return {
        "cpu": cpu_model(),
        "log": str(log_path),
        "rows": log["rows"],
        "distinct": log["distinct"],
        "distinct_share": round(log["distinct"] / log["rows"], 4),
        "distinct_share_at_prefix": share,
        **{k: v for k, v in replicated.items() if k != "distinct"},
        "copies": copies,
        "arrow_peak_rss_growth_mb_5x_rows": round(arrow5["peak_rss_growth_mb"], 1),
        "arrow_cpu_us_per_row_5x_rows": round(1e6 * arrow5["cpu_seconds"] / arrow5["rows"], 3),
        "log_python_us_per_row": log["python_us_per_row"],
        "log_arrow_us_per_row": log["arrow_us_per_row"],
        "log_python_peak_rss_growth_mb": log["python_peak_rss_growth_mb"],
        "log_arrow_peak_rss_growth_mb": log["arrow_peak_rss_growth_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", default="runs/w0/log.parquet", help="a Parquet query log with a `query` column")
    ap.add_argument("--rows", type=int, default=None, help="only the log's first N rows")
    ap.add_argument("--replicate-to", type=int, default=1_200_000, help="rows of the repeated log")
    ap.add_argument("--measure", nargs=3, metavar=("WAY", "INPUT", "OUT"), help=argparse.SUPPRESS)  # one child run
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure[1], args.measure[0], args.measure[2])))
        return
    print(json.dumps(prepare_figures(args.log, args.rows, args.replicate_to)))


if __name__ == "__main__":
    main()
