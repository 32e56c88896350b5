"""`querytune label --engine ray`: labeling as a Ray Data pipeline, one model replica per worker (a Ray actor).

The distinct queries left to label become a Ray Dataset; `map_batches` runs them through a pool of actors that
each load the model once; finished rows stream back to the driver, which writes them as shards (the same whole-shard,
resumable output as the local engine). `ray.init` starts a local cluster, or joins one when `RAY_ADDRESS` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np


class _Replica:
    """One model replica: loads the backend once, labels batches of normalised queries."""

    def __init__(self, model_dir: str, backend: str, batch_size: int, threads: int):
        import torch

        from querytune.backends import load_backend

        torch.set_num_threads(threads)
        self.backend = load_backend(backend, model_dir, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from querytune.label import parse_rows

        rows = parse_rows(self.backend, [str(q) for q in batch["normalized"]])
        return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


class RayEngine:
    """`stream(queries, shard_size)` for `querytune.label.label`; `model_version` / `schema_version` like a backend."""

    def __init__(self, model_dir: str | Path, backend: str = "transformers", workers: int = 2, batch_size: int = 32,
                 threads_per_worker: int = 1):
        import ray

        from querytune.model import load_model_meta, model_version

        _, schema = load_model_meta(model_dir)
        self.model_dir, self.kind, self.workers, self.batch_size, self.threads = str(Path(model_dir).resolve()), backend, workers, batch_size, threads_per_worker
        self.model_version, self.schema_version = model_version(model_dir), schema.version
        if not ray.is_initialized():
            import os

            # a local cluster gets logical CPUs for every replica plus one for Ray Data's own tasks (reading, splitting):
            # with only the machine's cores, the replicas can hold them all and the pipeline waits forever
            local = None if os.environ.get("RAY_ADDRESS") else max(os.cpu_count() or 1, workers * threads_per_worker + 1)
            ray.init(num_cpus=local, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False

    def stream(self, queries: list[str], shard_size: int) -> Iterator[list[dict]]:
        import ray

        blocks = max(1, min(len(queries) // self.batch_size, 4 * self.workers))
        ds = ray.data.from_items([{"normalized": q} for q in queries], override_num_blocks=blocks)
        out = ds.map_batches(_Replica, fn_constructor_kwargs={"model_dir": self.model_dir, "backend": self.kind, "batch_size": self.batch_size,
                                                              "threads": self.threads},
                             batch_size=self.batch_size, concurrency=self.workers, num_cpus=self.threads, batch_format="numpy")
        for batch in out.iter_batches(batch_size=shard_size, batch_format="pandas"):
            rows = batch.to_dict("records")
            for r in rows:
                r["valid"], r["confidence"] = bool(r["valid"]), float(r["confidence"])
                r["parse"] = r["parse"] if isinstance(r["parse"], str) else None
                r["error"] = r["error"] if isinstance(r["error"], str) else None
            yield rows

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
