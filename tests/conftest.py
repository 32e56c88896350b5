"""Shared fixtures: a small world made once per run, a hashing embedder for fast search tests, and (for the
tests marked slow) a real all-MiniLM-L6-v2 index over the small world, built once and shared."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from querytune.world.make import make_world

SMALL = {"seed": 0, "rows": 4000, "per_city": 60}


@pytest.fixture(scope="session")
def small_world_master(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_world(out, **SMALL)
    return out


@pytest.fixture()
def small_world(small_world_master, tmp_path) -> Path:
    """A private copy of the small world (tests may write into it)."""
    return Path(shutil.copytree(small_world_master, tmp_path / "world"))


class HashEmbedder:
    """Bag of hashed words, L2-normalised: a deterministic stand-in for MiniLM at the edge of unit tests."""

    name = "test/hash-bow"
    dim = 256

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().replace(".", " ").replace(",", " ").split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


@pytest.fixture()
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()


@pytest.fixture(scope="session")
def real_index(small_world_master, tmp_path_factory) -> Path:
    """FAISS index of the small world's catalog with the real all-MiniLM-L6-v2 (slow tests only)."""
    from querytune.search import Embedder, build_index

    out = tmp_path_factory.mktemp("index")
    build_index(pd.read_parquet(small_world_master / "catalog.parquet"), out, Embedder())
    return out
