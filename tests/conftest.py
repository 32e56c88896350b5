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
    """A private copy of the small world (tests may write into it) without audit/: the hidden needs are for
    evaluation only, so every training stage tested on this copy shows it never opens them."""
    return Path(shutil.copytree(small_world_master, tmp_path / "world", ignore=shutil.ignore_patterns("audit")))


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


@pytest.fixture(scope="session")
def tiny_base(small_world_master, tmp_path_factory) -> Path:
    """A tiny random Llama with a BPE tokenizer trained in-process (querytune.testing): what `--base` accepts. Built
    once per test run."""
    from querytune.testing import tiny_base as build

    return build(small_world_master / "seed.jsonl", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_base, small_world_master, tmp_path_factory) -> Path:
    """A model folder of the tiny Llama after two SFT steps on the small world's seed: what `--model` accepts in
    labeling and serving tests. Built once per test run."""
    from querytune.testing import tiny_model as build

    return build(small_world_master / "seed.jsonl", tiny_base, tmp_path_factory.mktemp("tiny-model") / "sft")


def memorise_parses(tiny_base: Path, rows: list[dict], out: Path, steps: int = 150, fmt: str = "compact") -> Path:
    """Train a tiny full-weights Llama (head size 64, which vLLM's CPU attention supports) until it writes the
    given parses (`rows`: text, intent, slots) for their texts in format `fmt`, and save it as a model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from querytune.runtime.formats import completion, prompt
    from querytune.runtime.model import save_model_meta
    from querytune.schema_file import load_schema

    schema = load_schema()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids, labels = [], []
    for r in rows:
        p_ids = tok(prompt(fmt, schema, tok, r["text"]), add_special_tokens=False).input_ids
        c_ids = tok(completion(fmt, r) + tok.eos_token, add_special_tokens=False).input_ids
        ids.append(p_ids + c_ids)
        labels.append([-100] * len(p_ids) + c_ids)
    width = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):  # every row in every step: the whole set is one batch
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_model_meta(
        out, schema, {"base": str(out), "adapter": False, "stage": "test", "format": fmt, "max_new_tokens": 64}
    )
    return out
