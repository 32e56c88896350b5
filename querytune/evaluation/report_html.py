"""The report's HTML page: one self-contained file (plots inlined as PNG), readable offline."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

# what the report shows: its metric columns and the slices it breaks them down by
RETRIEVAL = ("ndcg@10", "recall@10", "mrr")
PARSE = ("intent_accuracy", "slot_f1", "frame_exact_match", "validity")
SLICES = {"intent": "intent", "traffic": "head / torso / tail of the log", "user_city": "city",
          "effects": "phrasing effect", "phrasing_in_seed": "phrasing seen in the seed",
          "mechanisms": "world mechanism (where the guideline and the need part)"}
LIST_SLICES = ("effects", "mechanisms")  # a row may carry several values, or none


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1d2430;padding:0 1rem}
h1{margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #dde3ea;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem} th,td{padding:.3rem .6rem;border-bottom:1px solid #e8ecf1;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f4f6f9} .ci{color:#6b7785;font-size:.78rem}
.few{color:#9aa3ad;font-style:italic} img{max-width:100%;border:1px solid #e8ecf1;margin:.5rem 0}
code,pre{font-size:.8rem;background:#f6f8fa;padding:.1rem .3rem;border-radius:3px} .muted{color:#6b7785}
td.parse{text-align:left;font-family:ui-monospace,monospace;font-size:.75rem;max-width:28rem}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(metrics: dict[str, Any], columns: tuple[str, ...], title: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s, e in metrics["intervals"].items() if any(c in e for c in columns)]
    if not systems:
        return None
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 0.45 * len(systems) + 1.2), sharey=True)
    for ax, col in zip(axes if len(columns) > 1 else [axes], columns):
        vals = [metrics["intervals"][s].get(col) for s in systems]
        y = range(len(systems))
        v = [iv["value"] if iv else 0 for iv in vals]
        err = [[iv["value"] - iv["low"] if iv else 0 for iv in vals], [iv["high"] - iv["value"] if iv else 0 for iv in vals]]
        colors = ["#9aa3ad" if s in ("raw", "bm25", "peer") else "#2f6fb0" if s != "oracle" else "#5a9e4b" for s in systems]
        ax.barh(list(y), v, xerr=err, color=colors, capsize=3)
        for i, iv in enumerate(vals):
            if iv:
                ax.text(iv["high"] + 0.01, i, f"{iv['value']:.3f}", va="center", fontsize=8)
        ax.set_title(col)
        ax.set_xlim(0, 1.12)
        ax.set_yticks(list(y), systems)
        ax.invert_yaxis()
    fig.suptitle(title)
    return _png(fig)


def _slice_heatmap(metrics: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = [s for s in metrics["intervals"] if "ndcg@10" in metrics["intervals"][s]]
    labels, grid, few = [], [], []
    short = {"traffic": "traffic", "effects": "effect", "phrasing_in_seed": "seen phrasing", "intent": "intent"}
    for key in short:
        for value, entry in metrics["slices"].get(key, {}).items():
            cells = [np.nan if entry.get("too_few") else entry["systems"][s].get("ndcg@10", {}).get("value", np.nan) for s in systems]
            if not entry.get("too_few") and all(np.isnan(cells)):
                continue  # no graded query in this slice (e.g. out of scope): nothing to search for
            labels.append(f"{short[key]}: {value} (n={entry['n']})")
            grid.append(cells)
            few.append(bool(entry.get("too_few")))
    if not labels:
        return None
    data = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(systems) + 4, 0.34 * len(labels) + 1.4))
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, ("too few" if few[i] else "") if np.isnan(data[i, j]) else f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if np.isnan(data[i, j]) or data[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, shrink=0.6, label="NDCG@10")
    ax.set_title("NDCG@10 by slice")
    return _png(fig)


def _curves(curves: dict[str, list[dict]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss"), ("reward", "GRPO reward mean"), ("no_signal", "GRPO share of no-signal groups"),
              ("kl", "GRPO KL to the start"), ("margin", "DPO reward margin"), ("accuracy", "DPO pair accuracy")]
    panels = [(k, t) for k, t in panels if any(k in row for c in curves.values() for row in c)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, curve in curves.items():
            pts = [(r["step"], r[key]) for r in curve if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _table(headers: list[str], body: list[list[str]], raw_html: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{c if raw_html else html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _cell(iv: dict | None) -> str:
    return "" if not iv else f"{iv['value']:.3f}<br><span class=ci>[{iv['low']:.3f}, {iv['high']:.3f}]</span>"


def write_html(path: Path, metrics: dict[str, Any], curves: dict[str, list[dict]]) -> None:
    meta = metrics["meta"]
    cols = RETRIEVAL + PARSE
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>querytune report</title><style>{CSS}</style></head><body>",
             "<h1>querytune relevance report</h1>",
             f"<p class=muted>{meta['test_rows']} test queries ({meta['graded_rows']} with graded relevance), NDCG@{meta['k']}; "
             f"intervals: {meta['bootstrap']['interval']} bootstrap over test queries ({meta['bootstrap']['draws']} draws); "
             f"slices with fewer than {meta['min_slice']} queries say so. Written {meta['created']}.</p>",
             "<h2>Every stage side by side</h2>",
             _table(["system"] + list(cols), [[name] + [_cell(e.get(c)) for c in cols] for name, e in metrics["intervals"].items()], raw_html=True),
             "<p class=muted>raw / bm25: the query text searched with no understanding. peer: frozen MiniLM embeddings + logistic "
             "regression heads trained on the seed set. oracle: the gold parse, the ceiling of this search.</p>"]
    for img in (_bars(metrics, RETRIEVAL, "retrieval (95% bootstrap intervals)"),
                _bars(metrics, ("intent_accuracy", "slot_f1", "frame_exact_match"), "parsing (95% bootstrap intervals)")):
        if img:
            parts.append(f'<img alt="stage comparison" src="{img}">')
    parts.append("<h2>Slices</h2>")
    if img := _slice_heatmap(metrics):
        parts.append(f'<img alt="NDCG by slice" src="{img}">')
    systems = list(metrics["intervals"])
    for key, values in metrics["slices"].items():
        parts.append(f"<h3>By {html.escape(SLICES[key])}</h3>")
        body = []
        for value, entry in values.items():
            if entry.get("too_few"):
                body.append([html.escape(value), str(entry["n"]),
                       f"<span class=few>too few queries (n={entry['n']}) to show a number</span>"] + [""] * (len(systems) - 1))
            else:
                body.append([html.escape(value), str(entry["n"])] + [
                    _cell(entry["systems"].get(s, {}).get("ndcg@10")) + (f"<br><span class=ci>F1 {entry['systems'][s]['slot_f1']['value']:.3f}</span>"
                                                                         if "slot_f1" in entry["systems"].get(s, {}) else "") for s in systems])
        parts.append(_table(["slice", "n"] + systems, body, raw_html=True))
    if "real" in metrics:
        parts += ["<h2>Real-data check (another schema)</h2>",
                  _table(["run", "n", "intent", "slot F1", "frame EM", "validity"],
                         [[k, v.get("n"), *(f"{v[m]:.3f}" if v.get(m) is not None else "" for m in ("intent_accuracy", "slot_f1", "frame_exact_match", "validity"))]
                          for k, v in metrics["real"].items()])]
    parts.append("<h2>Training</h2>")
    if img := _curves(curves):
        parts.append(f'<img alt="training curves" src="{img}">')
    if metrics.get("training"):
        keys = sorted({k for t in metrics["training"].values() for k in t})
        parts.append(_table(["stage"] + keys, [[s] + [str(t.get(k, "")) for k in keys] for s, t in metrics["training"].items()]))
    if metrics.get("disagreements"):
        stages = list(metrics["disagreements"][0]["stages"])
        parts.append("<h2>Where the stages disagree most</h2><p class=muted>Test queries with the largest NDCG@10 spread across model "
                     "stages: each stage's parse, its NDCG@10 and the top 3 businesses it retrieved.</p>")
        body = []
        for d in metrics["disagreements"]:
            body.append([f"<b>{html.escape(d['text'])}</b><br><span class=ci>gold {html.escape(json.dumps(d['gold']['slots']))}</span>"] + [
                f"{s['ndcg@10']:.2f} &nbsp;<code>{html.escape(json.dumps(s['parse']['slots'] if s['parse'] else 'invalid'))}</code>"
                f"<br><span class=ci>{html.escape(' · '.join(s['top3']))}</span>" for s in d["stages"].values()])
        parts.append(_table(["query"] + stages, body, raw_html=True).replace("<td>", "<td class=parse>"))
    side = []
    if "labeling" in metrics:
        side.append(_table(["labels", "rows", "distinct", "labeled now", "seconds", "queries/s"],
                           [[k, v.get("rows"), v.get("distinct"), v.get("labeled_now"), v.get("seconds"), v.get("queries_per_s")]
                            for k, v in metrics["labeling"].items()]))
    if "serving" in metrics:
        s = metrics["serving"]
        side.append(_table(list(s), [[str(v) for v in s.values()]]))
    if side:
        parts += ["<h2>Labeling and serving</h2>", *side]
    parts.append(f"<p class=muted>metrics.json holds every number on this page. Models: {html.escape(json.dumps(meta['models']))}</p></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
