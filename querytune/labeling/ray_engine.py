"""`querytune label --engine ray`: labeling as a Ray Data pipeline, one model replica per worker (a Ray actor).

The distinct queries left to label become a Ray Dataset of small blocks; `map_batches` runs them through a fixed
pool of actors that each load the model once, each kept `TASKS_PER_REPLICA` blocks ahead (at least
`QUERIES_IN_FLIGHT` queries), so a replica never waits on the driver; finished rows stream back to the driver, which
writes them as shards (the same whole-shard, resumable output as the local engine). On GPU nodes a replica reserves a
share of a GPU (`gpus_per_replica`, e.g. 0.25: four replicas per GPU). `ray.init` starts a local cluster, or joins
one when `RAY_ADDRESS` is set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from querytune.runtime.model import ModelFolder

QUERIES_IN_FLIGHT = 1024  # per replica: its next batches are already there when one ends
TASKS_PER_REPLICA = 4  # Ray tasks (blocks) sent to a replica at once: one running, three queued


def task_queries(batch_size: int) -> int:
    """Queries per Ray task (one block): whole model batches, enough that `TASKS_PER_REPLICA` tasks hold at least
    `QUERIES_IN_FLIGHT` queries.

    >>> [task_queries(b) for b in (32, 100, 256, 2048)]
    [256, 300, 256, 2048]
    """
    return batch_size * math.ceil(QUERIES_IN_FLIGHT / TASKS_PER_REPLICA / batch_size)


class _Replica:
    """One model replica: loads the backend once, labels batches of normalised queries."""

    def __init__(
        self, model_dir: ModelFolder, backend: str, batch_size: int, threads: int, gpus: float, int8: bool = False
    ):
        import torch

        from querytune.runtime.backends import load_backend

        torch.set_num_threads(threads)
        # vLLM sizes its memory as a share of the whole GPU: replicas sharing one must each stay within their share
        options = {"gpu_memory_utilization": 0.9 * gpus} if gpus and backend == "vllm" else {}
        if int8:
            options["int8"] = True
        self.backend = load_backend(backend, model_dir, batch_size=batch_size, **options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from querytune.labeling.label import parse_rows

        rows = parse_rows(self.backend, [str(q) for q in batch["normalized"]])
        return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


class RayEngine:
    """`stream(queries, shard_size)` for `querytune.labeling.label.label`; `model_version` / `schema_version` like a
    backend."""

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "transformers",
        workers: int = 2,
        batch_size: int = 32,
        threads_per_worker: int = 1,
        gpus_per_replica: float = 0.0,
        int8: bool = False,
    ):
        import ray

        # the folder, read and hashed once here, travels to every replica with its version (pickled, not recomputed)
        self.folder = ModelFolder.open(Path(model_dir).resolve())
        self.model_dir, self.kind, self.workers, self.batch_size, self.threads = (
            str(self.folder.path),
            backend,
            workers,
            batch_size,
            threads_per_worker,
        )
        self.gpus, self.int8 = gpus_per_replica, int8
        self.model_version, self.schema_version = self.folder.version, self.folder.schema.version
        if not ray.is_initialized():
            import os

            # a local cluster gets logical CPUs for every replica plus one for Ray Data's own tasks (reading,
            # splitting):
            # with only the machine's cores, the replicas can hold them all and the pipeline waits forever
            local = (
                None if os.environ.get("RAY_ADDRESS") else max(os.cpu_count() or 1, workers * threads_per_worker + 1)
            )
            ray.init(num_cpus=local, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False

    def map_options(self) -> dict[str, Any]:
        """`map_batches`' arguments: a fixed pool of `workers` replicas, each with `TASKS_PER_REPLICA` tasks in flight,
        its CPU threads and share of a GPU."""
        import ray

        return {
            "fn_constructor_kwargs": {
                "model_dir": self.folder,
                "backend": self.kind,
                "batch_size": self.batch_size,
                "threads": self.threads,
                "gpus": self.gpus,
                "int8": self.int8,
            },
            "batch_size": self.batch_size,
            "batch_format": "numpy",
            "num_cpus": self.threads,
            "num_gpus": self.gpus,
            "compute": ray.data.ActorPoolStrategy(size=self.workers, max_tasks_in_flight_per_actor=TASKS_PER_REPLICA),
        }

    def stream(self, queries: list[str], shard_size: int) -> Iterator[list[dict]]:
        import ray

        size = task_queries(self.batch_size)  # one block per task: from_arrow makes a block of each table
        blocks = [
            pa.table({"normalized": pa.array(queries[i : i + size], pa.large_string())})
            for i in range(0, len(queries), size)
        ]
        out = ray.data.from_arrow(blocks).map_batches(_Replica, **self.map_options())
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
