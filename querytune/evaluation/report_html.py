"""The report's HTML page: one self-contained file (plots inlined as PNG), readable offline."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from querytune.evaluation import charts

# what the report shows: its metric columns and the slices it breaks them down by
RETRIEVAL = ("ndcg@10", "recall@10", "mrr")
PARSE = ("intent_accuracy", "slot_f1", "frame_exact_match", "validity")
SLICES = {
    "intent": "intent",
    "traffic": "head / torso / tail of the log",
    "user_city": "city",
    "effects": "phrasing effect",
    "phrasing_in_seed": "phrasing seen in the seed",
    "mechanisms": "world mechanism (where the guideline and the need part)",
}
LIST_SLICES = ("effects", "mechanisms")  # a row may carry several values, or none


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1d2430;
padding:0 1rem}
h1{margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #dde3ea;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{padding:.3rem .6rem;border-bottom:1px solid #e8ecf1;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f4f6f9} .ci{color:#6b7785;font-size:.78rem}
.few{color:#9aa3ad;font-style:italic} img{max-width:100%;border:1px solid #e8ecf1;margin:.5rem 0}
code,pre{font-size:.8rem;background:#f6f8fa;padding:.1rem .3rem;border-radius:3px} .muted{color:#6b7785}
td.parse{text-align:left;font-family:ui-monospace,monospace;font-size:.75rem;max-width:28rem}
.scroll{overflow-x:auto;max-width:100%}
.warn{background:#fff4e5;border-left:4px solid #e8a33d;padding:.7rem 1rem;margin:1rem 0}
"""


def barely_trained_note(metrics: dict[str, Any]) -> str | None:
    """The warning a report of barely trained models opens with (None when its models are trained)."""
    if not metrics.get("barely_trained"):
        return None
    return (
        "These models are barely trained (" + "; ".join(metrics["barely_trained"]) + f"), on "
        f"{metrics['meta']['test_rows']} test queries: a smoke test of the loop, whose figures say nothing about the "
        "method (raw text may beat every model; a stage may predict one intent for everything). For real figures "
        "run `make demo` (the quick presets, about an hour on 2 CPU cores) or train with `--preset quick`."
    )


def _figure(fig, alt: str) -> list[str]:
    return [f'<img alt="{html.escape(alt)}" src="{charts.png(fig)}">'] if fig is not None else []


def _against_baseline(metrics: dict[str, Any]) -> list[str]:
    paired, baseline = metrics.get("paired") or {}, metrics.get("baseline")
    if not paired:
        return []
    cols = [m for m in ("ndcg@10", "intent_accuracy", "slot_f1") if any(m in e for e in paired.values())]

    def signed(iv):
        return "" if not iv else f"{iv['value']:+.3f}<br><span class=ci>[{iv['low']:+.3f}, {iv['high']:+.3f}]</span>"

    return [
        f"<h2>Against {html.escape(baseline)}</h2><p class=muted>Each system minus {html.escape(baseline)} on the same "
        "test queries, with a paired bootstrap interval (queries resampled together): "
        "an interval that excludes zero is a difference this test set can tell.</p>",
        _table(
            ["system", *cols], [[name, *(signed(e.get(c)) for c in cols)] for name, e in paired.items()], raw_html=True
        ),
        *_figure(charts.forest(paired, baseline, tuple(cols)), f"difference from {baseline}"),
    ]


def _parsing(metrics: dict[str, Any]) -> list[str]:
    parts = ["<h2>Parsing in detail</h2>"]
    parts += _figure(charts.slot_f1(metrics.get("slot_f1_by_slot") or {}), "F1 per slot")
    parts += _figure(charts.confusion(metrics.get("intent_confusion") or {}), "intent confusion")
    if calib := {s: c for s, c in (metrics.get("calibration") or {}).items() if c}:
        parts += _figure(charts.calibration(calib), "calibration")
        parts.append(
            _table(
                ["stage", "queries", "expected calibration error"],
                [[s, c["n"], f"{c['ece']:.3f}"] for s, c in calib.items()],
            )
        )
    return parts if len(parts) > 1 else []


def _table(headers: list[str], body: list[list[str]], raw_html: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join(
        "<tr>" + "".join(f"<td>{c if raw_html else html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body
    )
    return f"<div class=scroll><table><tr>{head}</tr>{rows}</table></div>"  # a wide table scrolls, not the page


def _cell(iv: dict | None) -> str:
    return "" if not iv else f"{iv['value']:.3f}<br><span class=ci>[{iv['low']:.3f}, {iv['high']:.3f}]</span>"


def write_html(path: Path, metrics: dict[str, Any], curves: dict[str, list[dict]]) -> None:
    meta = metrics["meta"]
    cols = RETRIEVAL + PARSE
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>querytune report</title>"
        f"<style>{CSS}</style></head><body>",
        "<h1>querytune relevance report</h1>",
        *([f"<p class=warn><b>{html.escape(note)}</b></p>"] if (note := barely_trained_note(metrics)) else []),
        f"<p class=muted>{meta['test_rows']} test queries ({meta['graded_rows']} with graded relevance), "
        f"NDCG@{meta['k']}; intervals: {meta['bootstrap']['interval']} bootstrap over test queries "
        f"({meta['bootstrap']['draws']} draws); slices with fewer than {meta['min_slice']} queries say so. Written "
        f"{meta['created']}.</p>",
        "<h2>Every stage side by side</h2>",
        _table(
            ["system"] + list(cols),
            [[name] + [_cell(e.get(c)) for c in cols] for name, e in metrics["intervals"].items()],
            raw_html=True,
        ),
        "<p class=muted>raw / bm25: the query text searched with no understanding. peer: "
        "frozen MiniLM embeddings + logistic regression heads trained on the seed set. oracle: the gold parse, "
        "the ceiling of this search.</p>",
    ]
    parts += _figure(
        charts.bars(metrics["intervals"], RETRIEVAL, "retrieval (95% bootstrap intervals)"), "retrieval by system"
    )
    parts += _figure(
        charts.bars(
            metrics["intervals"],
            ("intent_accuracy", "slot_f1", "frame_exact_match"),
            "parsing (95% bootstrap intervals)",
        ),
        "parsing by system",
    )
    parts += _against_baseline(metrics)
    parts += _parsing(metrics)
    parts.append("<h2>Slices</h2>")
    parts += _figure(charts.slice_heatmap(metrics["intervals"], metrics["slices"]), "NDCG by slice")
    systems = list(metrics["intervals"])
    for key, values in metrics["slices"].items():
        parts.append(f"<h3>By {html.escape(SLICES[key])}</h3>")
        body = []
        for value, entry in values.items():
            if entry.get("too_few"):
                body.append(
                    [
                        html.escape(value),
                        str(entry["n"]),
                        f"<span class=few>too few queries (n={entry['n']}) to show a number</span>",
                    ]
                    + [""] * (len(systems) - 1)
                )
            else:
                body.append(
                    [html.escape(value), str(entry["n"])]
                    + [
                        _cell(entry["systems"].get(s, {}).get("ndcg@10"))
                        + (
                            f"<br><span class=ci>F1 {entry['systems'][s]['slot_f1']['value']:.3f}</span>"
                            if "slot_f1" in entry["systems"].get(s, {})
                            else ""
                        )
                        for s in systems
                    ]
                )
        parts.append(_table(["slice", "n"] + systems, body, raw_html=True))
    if "real" in metrics:
        parts += [
            "<h2>Real-data check (another schema)</h2>",
            _table(
                ["run", "n", "intent", "slot F1", "frame EM", "validity"],
                [
                    [
                        k,
                        v.get("n"),
                        *(
                            f"{v[m]:.3f}" if v.get(m) is not None else ""
                            for m in ("intent_accuracy", "slot_f1", "frame_exact_match", "validity")
                        ),
                    ]
                    for k, v in metrics["real"].items()
                ],
            ),
        ]
    parts.append("<h2>Training</h2>")
    parts += _figure(charts.curves(curves), "training curves")
    if metrics.get("training"):  # one column per stage: the stages are few, their logged keys many
        keys = sorted({k for t in metrics["training"].values() for k in t})
        stages = list(metrics["training"])
        parts.append(
            _table(["", *stages], [[k, *(str(metrics["training"][s].get(k, "")) for s in stages)] for k in keys])
        )
    if metrics.get("disagreements"):
        stages = list(metrics["disagreements"][0]["stages"])
        parts.append(
            "<h2>Where the stages disagree most</h2><p class=muted>Test queries with the largest NDCG@10 spread "
            "across model stages: each stage's parse, its NDCG@10 and the top 3 businesses it retrieved.</p>"
        )
        body = []
        for d in metrics["disagreements"]:
            body.append(
                [
                    f"<b>{html.escape(d['text'])}</b><br><span class=ci>gold "
                    f"{html.escape(json.dumps(d['gold']['slots']))}</span>"
                ]
                + [
                    f"{s['ndcg@10']:.2f} &nbsp;<code>"
                    f"{html.escape(json.dumps(s['parse']['slots'] if s['parse'] else 'invalid'))}</code>"
                    f"<br><span class=ci>{html.escape(' · '.join(s['top3']))}</span>"
                    for s in d["stages"].values()
                ]
            )
        parts.append(_table(["query"] + stages, body, raw_html=True).replace("<td>", "<td class=parse>"))
    side = []
    if "labeling" in metrics:
        side.append(
            _table(
                ["labels", "rows", "distinct", "labeled now", "seconds", "queries/s"],
                [
                    [
                        k,
                        v.get("rows"),
                        v.get("distinct"),
                        v.get("labeled_now"),
                        v.get("seconds"),
                        v.get("queries_per_s"),
                    ]
                    for k, v in metrics["labeling"].items()
                ],
            )
        )
    if "serving" in metrics:
        s = metrics["serving"]
        side.append(_table(list(s), [[str(v) for v in s.values()]]))
    if cache := metrics.get("cache_coverage"):
        side += _figure(charts.coverage(cache), "cache coverage")
        side.append(
            _table(
                ["cache filled from", *(f"top {p['top_n']:,}" for p in next(iter(cache["curves"].values())))],
                [[name, *(f"{p['coverage']:.3f}" for p in points)] for name, points in cache["curves"].items()],
            )
        )
    if side:
        parts += ["<h2>Labeling and serving</h2>", *side]
    if browser := metrics.get("browser"):
        parts.append(
            "<h2>Browse the parses</h2><p>Every test query with its gold parse and each system's parse, validity, "
            f"confidence and NDCG@10 is in <code>{html.escape(browser)}</code> (SQLite, table <code>parses</code>): "
            f"<code>datasette {html.escape(browser)}</code> opens it in a browser, <code>sqlite3</code> queries it.</p>"
        )
    parts.append(
        "<p class=muted>metrics.json holds every number on this page. Models: "
        f"{html.escape(json.dumps(meta['models']))}</p></body></html>"
    )
    path.write_text("\n".join(parts), encoding="utf-8")
