"""The report's charts (matplotlib, drawn off screen): each function takes metrics.json's numbers and returns a Figure,
or None when there is nothing to draw; `png` inlines one in the page. Figures with panels use the constrained layout,
which keeps a figure's title clear of its panels' titles."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

BASELINES = ("raw", "bm25", "peer")  # systems that do not learn from the loop: drawn grey


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _colour(system: str) -> str:
    return "#9aa3ad" if system in BASELINES else "#5a9e4b" if system == "oracle" else "#2f6fb0"


def bars(intervals: dict[str, dict], columns: tuple[str, ...], title: str) -> Figure | None:
    """One panel per metric: each system's value with its 95% interval."""
    systems = [s for s, e in intervals.items() if any(c in e for c in columns)]
    if not systems:
        return None
    fig, axes = plt.subplots(
        1,
        len(columns),
        figsize=(4.2 * len(columns), 0.45 * len(systems) + 1.4),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, col in zip(axes[0], columns):
        vals = [intervals[s].get(col) for s in systems]
        y = list(range(len(systems)))
        v = [iv["value"] if iv else 0 for iv in vals]
        err = [
            [iv["value"] - iv["low"] if iv else 0 for iv in vals],
            [iv["high"] - iv["value"] if iv else 0 for iv in vals],
        ]
        ax.barh(y, v, xerr=err, color=[_colour(s) for s in systems], capsize=3)
        for i, iv in enumerate(vals):
            if iv:
                ax.text(iv["high"] + 0.01, i, f"{iv['value']:.3f}", va="center", fontsize=8)
        ax.set_title(col, fontsize=10)
        ax.set_xlim(0, 1.12)
        ax.set_yticks(y, systems)
        ax.invert_yaxis()
    fig.suptitle(title)
    return fig


def forest(paired: dict[str, dict[str, dict]], baseline: str, metrics: tuple[str, ...]) -> Figure | None:
    """Each system minus the baseline, per metric, with its paired 95% interval; the zero line is the baseline."""
    metrics = tuple(m for m in metrics if any(m in e for e in paired.values()))
    if not metrics:
        return None
    systems = list(paired)
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(4.2 * len(metrics), 0.45 * len(systems) + 1.4),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, metric in zip(axes[0], metrics):
        for i, s in enumerate(systems):
            iv = paired[s].get(metric)
            if iv:
                colour = "#2f6fb0" if iv["low"] > 0 else "#c0392b" if iv["high"] < 0 else "#6b7785"
                ax.errorbar(
                    iv["value"],
                    i,
                    xerr=[[iv["value"] - iv["low"]], [iv["high"] - iv["value"]]],
                    fmt="o",
                    color=colour,
                    capsize=3,
                )
                ax.annotate(
                    f"{iv['value']:+.3f}",
                    (iv["high"], i),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=8,
                )
        ax.axvline(0, color="#1d2430", lw=0.8)
        ax.set_title(metric, fontsize=10)
        ax.set_yticks(range(len(systems)), systems)
        ax.set_ylim(len(systems) - 0.5, -0.5)
        ax.margins(x=0.25)
    fig.suptitle(f"difference from {baseline} (paired 95% bootstrap intervals; blue: better, red: worse)")
    return fig


def slice_heatmap(intervals: dict[str, dict], slices: dict[str, dict]) -> Figure | None:
    """NDCG@10 of every system in every slice big enough to show a number."""
    systems = [s for s in intervals if "ndcg@10" in intervals[s]]
    labels, grid, few = [], [], []
    short = {"traffic": "traffic", "effects": "effect", "phrasing_in_seed": "seen phrasing", "intent": "intent"}
    for key in short:
        for value, entry in slices.get(key, {}).items():
            cells = [
                np.nan if entry.get("too_few") else entry["systems"][s].get("ndcg@10", {}).get("value", np.nan)
                for s in systems
            ]
            if not entry.get("too_few") and all(np.isnan(cells)):
                continue  # no graded query in this slice (e.g. out of scope): nothing to search for
            labels.append(f"{short[key]}: {value} (n={entry['n']})")
            grid.append(cells)
            few.append(bool(entry.get("too_few")))
    if not labels:
        return None
    data = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(systems) + 4, 0.34 * len(labels) + 1.4), layout="constrained")
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(
                j,
                i,
                ("too few" if few[i] else "") if np.isnan(data[i, j]) else f"{data[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if np.isnan(data[i, j]) or data[i, j] > 0.6 else "white",
            )
    fig.colorbar(im, ax=ax, shrink=0.6, label="NDCG@10")
    ax.set_title("NDCG@10 by slice")
    return fig


def calibration(curves: dict[str, dict]) -> Figure | None:
    """Reliability diagram: share of right parses against mean confidence per bin, one line per stage."""
    curves = {s: c for s, c in curves.items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.4), layout="constrained")
    ax.plot([0, 1], [0, 1], color="#9aa3ad", lw=0.8, ls="--", label="calibrated")
    for stage, c in curves.items():
        ax.plot(
            [b["confidence"] for b in c["bins"]],
            [b["right"] for b in c["bins"]],
            marker="o",
            lw=1.2,
            label=f"{stage} (ECE {c['ece']:.3f})",
        )
    ax.set_xlabel("parse confidence (bin mean)")
    ax.set_ylabel("share of parses right (frame exact)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("calibration of the parse confidence")
    return fig


def confusion(by_stage: dict[str, dict]) -> Figure | None:
    """Gold intent against predicted intent, row-normalised, one panel per stage."""
    if not by_stage:
        return None
    fig, axes = plt.subplots(1, len(by_stage), figsize=(4.6 * len(by_stage), 4.2), squeeze=False, layout="constrained")
    for ax, (stage, c) in zip(axes[0], by_stage.items()):
        counts = np.array(c["counts"], dtype=float)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        int(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black",
                    )
        ax.set_xticks(range(len(c["predicted"])), c["predicted"], rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(c["gold"])), c["gold"], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_title(stage, fontsize=10)
    axes[0][0].set_ylabel("gold")
    fig.suptitle("intent confusion (counts; colour: share of the gold intent's queries)")
    return fig


def slot_f1(by_system: dict[str, dict[str, dict]]) -> Figure | None:
    """F1 of every slot (rows, by support) for every system (columns)."""
    support: dict[str, int] = {}
    for table in by_system.values():
        for slot, m in table.items():
            support[slot] = max(support.get(slot, 0), m["support"])
    slots = [s for s in sorted(support, key=lambda s: -support[s]) if support[s] > 0]
    if not slots:
        return None
    systems = list(by_system)
    data = np.array([[by_system[sys].get(s, {}).get("f1", np.nan) for sys in systems] for s in slots], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(systems) + 3.5, 0.3 * len(slots) + 1.4), layout="constrained")
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if data[i, j] > 0.6 else "white",
                )
    ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right")
    ax.set_yticks(range(len(slots)), [f"{s} (n={support[s]})" for s in slots], fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.6, label="slot F1")
    ax.set_title("F1 per slot (n: gold values in the test set)")
    return fig


def coverage(cache: dict[str, Any] | None) -> Figure | None:
    """Share of the log's searches answered from a cache of its top N queries, against N."""
    if not cache:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8), layout="constrained")
    for name, points in cache["curves"].items():
        ax.plot([p["top_n"] for p in points], [p["coverage"] for p in points], marker="o", lw=1.2, label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("cache entries (the log's most frequent normalised queries)")
    ax.set_ylabel("share of searches answered")
    ax.legend(fontsize=8)
    ax.set_title(f"cache coverage ({cache['rows']:,} searches, {cache['distinct']:,} distinct)")
    return fig


def curves(steps: dict[str, list[dict]]) -> Figure | None:
    """Training curves of every stage, one panel per logged quantity."""
    panels = [
        ("loss", "training loss"),
        ("reward", "GRPO reward mean"),
        ("no_signal", "GRPO share of no-signal groups"),
        ("kl", "GRPO KL to the start"),
        ("margin", "DPO reward margin"),
        ("accuracy", "DPO pair accuracy"),
    ]
    panels = [(k, t) for k, t in panels if any(k in row for c in steps.values() for row in c)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for ax, (key, title) in zip(axes.flat, panels):
        for name, curve in steps.items():
            pts = [(r["step"], r[key]) for r in curve if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return fig
