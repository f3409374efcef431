"""Running shard jobs: in this process, or as dask.distributed tasks (one task per shard).

Kept beside the build recipe, not inside it: the recipe only produces ``ShardJob``s. With
dask, each worker process keeps one warm teacher engine (``shard.warm_engine``) across the
shards it runs; a worker lost mid-shard leaves no commit, so the scheduler's retry on another
worker rewrites that shard from scratch.

By default (``background``) each process commits a shard in its commit thread while the teacher
captures the next (``commits``): a job returns before its commit is durable, so ``run_jobs``
counts a shard only from its commit file and returns only when every commit of the run is done
(the seal follows it). A failed commit fails the run with its error. On dask, the driver then
waits for every worker's commits (``Client.run``), and a shard whose pending commit died with its
worker is run again, committing before its task returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from kd.pipeline.build.commits import COMMITS, CommitReport, flush_run
from kd.pipeline.build.progress import BuildProgress
from kd.pipeline.build.shard import ShardJob, job_build, run_shard

GPU_RESOURCE = "GPU"


def run_jobs(jobs: list[ShardJob], *, workers: int = 0, scheduler: str | None = None,
             progress: BuildProgress | None = None, background: bool = True) -> list[dict[str, Any]]:
    """Run every job; return once each shard is committed, with one stats dict a shard.

    ``background=False``: each shard commits before the next one's capture starts (no overlap).
    """
    if not jobs:
        return []
    run = uuid.uuid4().hex  # this run's commits, apart from other builds' on a shared worker
    jobs = [dataclasses.replace(job, run=run) for job in jobs]
    if scheduler or workers > 0:
        return _run_dask(jobs, workers=workers, scheduler=scheduler, progress=progress, background=background)
    commits = COMMITS if background else None
    out = []
    try:
        for job in jobs:
            out.append(run_shard(job, on_batch=progress.advance if progress else None, commits=commits))
            _count(out[-1], progress)
        if commits is not None:
            _count(_as_stats(commits.collect(run, wait=True)), progress)
    finally:
        if commits is not None:  # on an error too: no commit of this build may outlive it
            commits.collect(run, wait=True)
    return out


def _as_stats(report: CommitReport) -> dict[str, Any]:
    return {"pending": 1, "committed": report.committed, "failed": report.failed}


def _count(stats: dict[str, Any], progress: BuildProgress | None) -> None:
    """Raise a failed commit's error; tick the shards now committed (or skipped)."""
    CommitReport(failed=list(stats.get("failed") or [])).raise_failure()
    if progress:
        done = len(stats.get("committed") or []) + (not stats["pending"] and not stats.get("aborted", 0))
        for _ in range(done):
            progress.shard_done()


def task_key(job: ShardJob) -> str:
    """The dask key of one shard's task.

    dask runs a key once per cluster, so the key names the cache's full URL (a digest of it),
    not just its directory name: two builds of the same cache into different roots on one
    cluster must not share each other's tasks, while a rerun into the same root may.
    """
    digest = hashlib.sha256(job.cache_url.encode()).hexdigest()[:12]
    return f"kd-shard-{job.cache_url.rstrip('/').rsplit('/', 1)[-1]}-{digest}-{job.shard:05d}"


def _dask_task(job: ShardJob, background: bool = True) -> dict[str, Any]:
    return run_shard(job, commits=COMMITS if background else None)


def _run_dask(jobs: list[ShardJob], *, workers: int, scheduler: str | None,
              progress: BuildProgress | None, background: bool) -> list[dict[str, Any]]:
    from distributed import Client, LocalCluster

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
        results = _gather(client, jobs, resources, background, progress)
        if background:
            _count(_flush(client, jobs[0].run), progress)
            committed = job_build(jobs[0]).committed()
            lost = [job for job in jobs if job.shard not in committed]  # pending when their worker died
            if lost:
                results.update(_gather(client, lost, resources, False, progress, again=True))
        return sorted(results.values(), key=lambda s: s["shard"])
    except BaseException:
        if background:  # best effort: the workers' commits of this run end before the build's lease does
            with contextlib.suppress(Exception):
                _flush(client, jobs[0].run)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _gather(client, jobs: list[ShardJob], resources: dict[str, int] | None, background: bool,
            progress: BuildProgress | None, again: bool = False) -> dict[int, dict[str, Any]]:
    """Submit ``jobs`` as tasks and wait for them; their stats by shard (``again``: a rerun, new keys)."""
    from distributed import as_completed

    futures = [
        client.submit(_dask_task, job, background, key=task_key(job) + ("-again" if again else ""),
                      resources=resources, retries=2, pure=False)
        for job in jobs
    ]
    results = {}
    for fut in as_completed(futures):
        stats = fut.result()
        fut.release()  # a lost worker's finished task is not recomputed unseen: lost commits are rerun here
        results[stats["shard"]] = stats
        if progress and not again:  # a rerun's samples were counted once already
            progress.advance(stats["samples"], stats["tokens"])
        _count(stats, progress)
    return results


def _flush(client, run: str) -> dict[str, Any]:
    """Wait for every worker's commits of ``run``; their reports merged (a worker lost meanwhile
    reports nothing: its shards are found uncommitted)."""
    merged: dict[str, Any] = {"pending": 1, "committed": [], "failed": []}
    for report in client.run(flush_run, run, on_error="return").values():
        if isinstance(report, dict):
            merged["committed"] += report["committed"]
            merged["failed"] += report["failed"]
    return merged


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """Restore os.environ afterwards: a build must not change what the caller's later subprocesses inherit."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
