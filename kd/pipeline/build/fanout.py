"""Running shard jobs: in this process, or as dask.distributed tasks (one task per shard).

Kept beside the build recipe, not inside it: the recipe only produces ``ShardJob``s. With
dask, each worker process keeps one warm teacher engine (``shard.warm_engine``) across the
shards it runs; a worker lost mid-shard leaves no commit, so the scheduler's retry on another
worker rewrites that shard from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from kd.pipeline.build.progress import BuildProgress
from kd.pipeline.build.shard import ShardJob, run_shard

GPU_RESOURCE = "GPU"


def run_jobs(jobs: list[ShardJob], *, workers: int = 0, scheduler: str | None = None,
             progress: BuildProgress | None = None) -> list[dict[str, Any]]:
    if not jobs:
        return []
    if scheduler or workers > 0:
        return _run_dask(jobs, workers=workers, scheduler=scheduler, progress=progress)
    out = []
    for job in jobs:
        out.append(run_shard(job, on_batch=progress.advance if progress else None))
        if progress:
            progress.shard_done()
    return out


def task_key(job: ShardJob) -> str:
    """The dask key of one shard's task.

    dask runs a key once per cluster, so the key names the cache's full URL (a digest of it),
    not just its directory name: two builds of the same cache into different roots on one
    cluster must not share each other's tasks, while a rerun into the same root may.
    """
    digest = hashlib.sha256(job.cache_url.encode()).hexdigest()[:12]
    return f"kd-shard-{job.cache_url.rstrip('/').rsplit('/', 1)[-1]}-{digest}-{job.shard:05d}"


def _dask_task(job: ShardJob) -> dict[str, Any]:
    return run_shard(job)


def _run_dask(jobs: list[ShardJob], *, workers: int, scheduler: str | None,
              progress: BuildProgress | None) -> list[dict[str, Any]]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        # Processes, one thread each: one engine per process, no GIL contention between them.
        with _environ_kept():  # distributed sets OMP_NUM_THREADS=1 etc. in *this* process's environment
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    try:
        wants_gpu = jobs[0].request.get("device", "cpu").startswith("cuda") and scheduler is not None
        resources = {GPU_RESOURCE: 1} if wants_gpu else None
        futures = [
            client.submit(_dask_task, job, key=task_key(job), resources=resources, retries=2, pure=False)
            for job in jobs
        ]
        results = []
        for fut in as_completed(futures):
            stats = fut.result()
            results.append(stats)
            if progress:
                progress.advance(stats["samples"], stats["tokens"])
                progress.shard_done()
        return sorted(results, key=lambda s: s["shard"])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """Restore os.environ afterwards: a build must not change what the caller's later subprocesses inherit."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
