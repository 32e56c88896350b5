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


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_base(small_world_master, tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a BPE tokenizer trained in-process on world queries and
    parse JSON, saved as a Hugging Face folder: what `--base` accepts. Built once per test run."""
    import json as _json

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from querytune.model import completion_text

    rows = [_json.loads(line) for line in (small_world_master / "seed.jsonl").read_text().splitlines()]
    corpus = [r["text"] for r in rows] + [completion_text(r) for r in rows] + ["local parser", "sgd parser"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_base, small_world_master, tmp_path_factory) -> Path:
    """A model folder (querytune.json, schema, adapter) of the tiny Llama after two SFT steps on the small world's
    seed: what `--model` accepts in labeling and serving tests. Built once per test run."""
    from querytune.labeled import load_labeled
    from querytune.schema import load_schema
    from querytune.sft import train_sft

    schema = load_schema()
    rows, _ = load_labeled(small_world_master / "seed.jsonl", schema)
    out = tmp_path_factory.mktemp("tiny-model") / "sft"
    train_sft(rows[:32], schema, out, str(tiny_base), {"max_steps": 2, "epochs": 1.0, "batch_size": 4, "lr": 1e-3, "lora_r": 4,
                                                        "lora_alpha": 8, "warmup_steps": 0, "bf16": False}, say=lambda _: None)
    return out
