"""Tiny in-process models for tests and the reliability scripts under eval/: built in seconds, no download.

base = tiny_base(world / "seed.jsonl", out / "base")          # a random Llama + BPE tokenizer: what `--base` takes
model = tiny_model(world / "seed.jsonl", base, out / "sft")  # two SFT steps on it: a model folder for `--model`
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_base(seed_jsonl: Path, out: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a BPE tokenizer trained on the seed's queries and their parses in
    every format, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from querytune.runtime.formats import FORMATS, completion

    rows = [json.loads(line) for line in Path(seed_jsonl).read_text().splitlines()]
    corpus = (
        [r["text"] for r in rows] + [completion(f, r) for f in FORMATS for r in rows] + ["local parser", "sgd parser"]
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=800,
            special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def tiny_model(seed_jsonl: Path, base: Path, out: Path, fmt: str = "user-compact") -> Path:
    """A model folder (querytune.json, schema, adapter) of the tiny Llama after two SFT steps on the seed,
    in format `fmt`."""
    from querytune.labeled import load_labeled
    from querytune.schema_file import load_schema
    from querytune.train.sft import SFTRecipe, train_sft

    schema = load_schema()
    rows, _ = load_labeled(seed_jsonl, schema)
    train_sft(
        rows[:32],
        schema,
        out,
        str(base),
        SFTRecipe(
            max_steps=2, batch_size=4, lr=1e-3, lora_r=4, lora_alpha=8, warmup_steps=0, bf16=False, max_minutes=None
        ),
        say=lambda _: None,
        fmt=fmt,
    )
    return Path(out)


def free_port() -> int:
    """A free TCP port on loopback (for a server a test or a script starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """A process's resident size now, in MB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def start_server(args: list[str], log: Path, seconds: float = 120):
    """`querytune serve ARGS --port <free>` on one thread, its output into `log`, once /healthz answers. Returns
    (process, base URL); exits with the log's name when it does not come up."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    qt = str(Path(sys.executable).parent / "querytune")
    proc = subprocess.Popen(
        [qt, "serve", *args, "--port", str(port)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    url, deadline = f"http://127.0.0.1:{port}", time.time() + seconds
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"querytune serve did not come up within {seconds:g} s; see {log}")
        time.sleep(0.3)


def tiny_world_and_model(root: Path, rows: int = 4000, per_city: int = 60) -> tuple[Path, Path]:
    """(world, model folder) under `root`: a small world (the tests' size by default) and the tiny model on its seed."""
    from querytune.world.make import make_world

    world = Path(root) / "world"
    make_world(world, seed=0, rows=rows, per_city=per_city)
    return world, tiny_model(
        world / "seed.jsonl", tiny_base(world / "seed.jsonl", Path(root) / "base"), Path(root) / "sft"
    )
