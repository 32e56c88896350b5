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


def memorise_parses(tiny_base: Path, rows: list[dict], out: Path, steps: int = 150) -> Path:
    """Train a tiny full-weights Llama (head size 64, which vLLM's CPU attention supports) until it writes the
    given parses (`rows`: text, intent, slots) for their texts, and save it as a model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from querytune.model import completion_text, prompt_messages, save_model_meta
    from querytune.schema import load_schema

    schema = load_schema()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    ids, labels = [], []
    for r in rows:
        prompt = tok.apply_chat_template(prompt_messages(schema, r["text"]), add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        c_ids = tok(completion_text(r) + tok.eos_token, add_special_tokens=False).input_ids
        ids.append(p_ids + c_ids)
        labels.append([-100] * len(p_ids) + c_ids)
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids]),
             "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):  # every row in every step: the whole set is one batch
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_model_meta(out, schema, {"base": str(out), "adapter": False, "stage": "test", "max_new_tokens": 64})
    return out
