"""One shard's work, the same in-process and in a dask worker: capture its samples, commit them.

Each process keeps one warm teacher engine per (engine, model, device, dtype, layers) and the
dataset's records by id across the shards it runs, so a worker pays start-up once. Given the
process's ``BackgroundCommits``, a shard's commit (and its samples' checks) runs behind the
capture of the next shard (``commits``); the job then returns before its commit is durable,
saying so (``pending``), and only a published commit file counts the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from kd.cache_schema import CacheBuild, Location
from kd.cache_schema.writer import shard_commit_name
from kd.pipeline.build.commits import BackgroundCommits
from kd.pipeline.build.request import BuildRequest
from kd.pipeline.common.dataset import Record, RecordTable, fingerprint_and_hashes, load_records


@dataclass
class ShardJob:
    """A self-contained description of one shard's work (sent to dask workers as plain data)."""

    request: dict[str, Any]
    engine: str
    cache_url: str
    key_inputs: dict[str, Any]
    teacher_meta: dict[str, Any]
    shard: int
    sample_ids: list[str]
    content_hashes: list[str] | None = None  # each sample's record hash (None: computed here)
    run: str = ""  # the build run (``fanout.run_jobs``) whose background commits this shard's joins


_WARM_ENGINES: dict[tuple, Any] = {}
CHECK_EVERY = 32  # samples added between two background checks (ShardWriter.check_added)


class _Kept(NamedTuple):
    """The self-check's capture of a build's first batch, and what it was captured from."""

    engine: Any
    sample_ids: tuple[str, ...]
    content_hashes: tuple[str, ...]
    spec: Any
    signals: list


_KEPT: list[_Kept] = []  # at most one


def keep_captured(engine: Any, signals: list, content_hashes: tuple[str, ...], spec: Any) -> None:
    """Keep ``engine``'s capture ``signals`` (the self-check's) for the shard batch of exactly those
    samples with the same contents, which then writes it instead of capturing it again: the same
    engine, inputs and spec give the same signals (resumes rely on it too)."""
    ids = tuple(s.sample_id for s in signals)
    _KEPT[:] = [_Kept(engine, ids, tuple(content_hashes), spec, list(signals))] if signals else []


def drop_captured() -> None:
    """Forget a kept capture no shard took (the build is over)."""
    _KEPT.clear()


def _capture(engine: Any, sample_ids: list[str], content_hashes: list[str], inputs: list[dict], spec: Any) -> list:
    kept = _KEPT[0] if _KEPT else None
    if kept and kept.engine is engine and (kept.sample_ids, kept.content_hashes, kept.spec) == (
            tuple(sample_ids), tuple(content_hashes), spec):
        return _KEPT.pop().signals
    return engine.capture(inputs, spec)


def warm_engine(request: BuildRequest, engine: str):
    """One warm engine per process and (engine, model, dtype): workers reuse it across shards."""
    key = (engine, str(Path(request.teacher).resolve()), request.device, request.dtype, tuple(request.hidden_layers))
    if key not in _WARM_ENGINES:
        from kd.pipeline.build.engines import load_engine

        if engine == "vllm":  # vLLM's KV-transfer state is per process: one vLLM engine alive at a time
            for other in [k for k in _WARM_ENGINES if k[0] == "vllm"]:
                _WARM_ENGINES.pop(other).close()

        opts = dict(request.engine_options)
        if engine == "vllm":
            opts.setdefault("hidden_layers", tuple(request.hidden_layers))
        else:
            opts.setdefault("batch_size", request.batch_size)
        _WARM_ENGINES[key] = load_engine(engine, request.teacher, device=request.device, dtype=request.dtype,
                                         trust_remote_code=request.trust_remote_code, **opts)
    return _WARM_ENGINES[key]


def close_warm_engines() -> None:
    """Close every engine this process keeps warm (frees a vLLM engine's device memory)."""
    drop_captured()
    while _WARM_ENGINES:
        _WARM_ENGINES.popitem()[1].close()


class _RecordsById:
    """A dataset's records by id, kept by each build worker across its shards: a ``RecordTable``
    and a ``SampleIdIndex`` (~0.3 KB per record, where a dict of Records took ~0.8 KB)."""

    def __init__(self, records: list[Record], where: str) -> None:
        import pyarrow as pa

        from kd.cache_schema.id_lookup import SampleIdIndex

        self.where = where
        self.table = RecordTable(records)
        self.index = SampleIdIndex(pa.array([r.id for r in records], pa.string()))

    def get(self, sample_ids: list[str]) -> list[Record]:
        rows = self.index.rows(sample_ids)
        if (rows < 0).any():
            missing = sample_ids[int((rows < 0).argmax())]
            raise KeyError(f"sample {missing!r} of the build plan is not in {self.where}")
        return self.table.take(rows.tolist())


_RECORDS: dict[str, _RecordsById] = {}


def _records_by_id(path: str) -> _RecordsById:
    if path not in _RECORDS:
        _RECORDS[path] = _RecordsById(load_records(path, check_images=False), path)
    return _RECORDS[path]


def job_build(job: ShardJob) -> CacheBuild:
    """The cache a job writes into."""
    request = BuildRequest(**job.request)
    return CacheBuild(Location.from_url(request.out), job.key_inputs, job.teacher_meta, request.signal_config())


def run_shard(job: ShardJob, on_batch: Callable[[int, int], None] | None = None,
              commits: BackgroundCommits | None = None) -> dict[str, Any]:
    """Capture one shard and commit it, skipping it when another run already committed it.

    Without ``commits`` it returns once the shard is committed. With them, the commit (samples'
    checks included) is handed to ``commits`` and the stats say ``pending``; they also carry the
    finished commits of the job's run in this process (``committed``, ``failed``: earlier shards').
    A failed earlier commit stops the capture (``aborted``): the build fails with its error.
    """
    request = BuildRequest(**job.request)
    build = job_build(job)
    stats: dict[str, Any] = {"shard": job.shard, "samples": 0, "tokens": 0, "skipped": 0, "pending": 0,
                             "aborted": 0, "committed": [], "failed": []}
    if build.location.exists(shard_commit_name(job.shard)):  # one file, not every commit of the cache
        return {**stats, "skipped": 1}
    engine = warm_engine(request, job.engine)
    spec = request.signal_spec()
    records = _records_by_id(request.data)
    writer = build.shard_writer(job.shard)
    shard_records = records.get(job.sample_ids)  # at once: decoding them batch by batch cost ~4x as much
    inputs = [r.as_dict() for r in shard_records]
    hashes = job.content_hashes
    if hashes is None:
        hashes = fingerprint_and_hashes(shard_records)[1]
    tokens = unchecked = 0
    for i in range(0, len(job.sample_ids), request.batch_size):
        if commits is not None and commits.has_failed(job.run):
            return _reported({**stats, "aborted": 1}, commits, job.run)
        if commits is not None and unchecked >= CHECK_EVERY:  # checked while the teacher works on this batch
            commits.check(job.run, job.shard, writer)
            unchecked = 0
        span = slice(i, i + request.batch_size)
        batch = shard_records[span]
        outputs = _capture(engine, job.sample_ids[span], hashes[span], inputs[span], spec)
        n_tok = 0
        for record, signals, content_hash in zip(batch, outputs, hashes[span]):
            writer.add(signals, record.capability, content_hash, check=commits is None)
            n_tok += signals.num_tokens
        tokens += n_tok
        unchecked += len(batch)
        if on_batch:
            on_batch(len(batch), n_tok)
    stats.update(samples=len(job.sample_ids), tokens=tokens)
    if commits is None:
        writer.commit()
        return stats
    if not commits.submit(job.run, job.shard, writer):
        return _reported({**stats, "aborted": 1}, commits, job.run)
    return _reported({**stats, "pending": 1}, commits, job.run)


def _reported(stats: dict[str, Any], commits: BackgroundCommits, run: str) -> dict[str, Any]:
    report = commits.collect(run)
    return {**stats, "committed": report.committed, "failed": report.failed}
