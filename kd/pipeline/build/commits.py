"""Shard commits off the teacher's critical path: a background thread per process encodes and
writes shard N (``ShardWriter.commit``: sample checks, value and id coding, zstd, zarr, checksums,
the commit file) while the teacher captures shard N+1, and checks the samples added so far
(``check``, every few batches) while the teacher captures the next batch.

At most one commit runs behind the capture: ``submit`` first waits for the one before, so a
process holds two shards' outputs at most, never a growing queue (and a commit slower than the
teacher shows as wait, ``wait_s``). Finished commits are reported per build run (``run``, an id
of one build's ``run_jobs``) exactly once, by ``collect``: a shard counts only once its commit
file is published, and a failed commit comes back as the build's error naming the shard
(``commit_error``). ``collect(wait=True)`` returns only when every commit of the run is done: a
build never returns, raises or seals while one of its commits still writes. Numpy, zstd and
zarr release the GIL for most of a commit, so one thread overlaps it with the capture
(bench/writer_overlap.py measures what the teacher still waits for).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kd.cache_schema import ShardWriter
from kd.cache_schema.errors import CacheError


class ShardCommitError(CacheError):
    """A shard's background commit failed; nothing of that shard is committed."""


def commit_error(shard: int, cache_url: str, error: BaseException) -> BaseException:
    """The build's error for a failed commit: a ``CacheError`` already names its shard or file
    (a full disk names the attempt directory) and stays as it is; anything else is wrapped
    naming the shard and the cache."""
    if isinstance(error, CacheError):
        return error
    wrapped = ShardCommitError(f"shard {shard} of {cache_url}: its commit failed: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


@dataclass
class CommitReport:
    """The commits of one run that finished since its last report."""

    committed: list[int] = field(default_factory=list)  # shards whose commit file is published
    failed: list[tuple[int, BaseException]] = field(default_factory=list)  # (shard, the build's error)

    def raise_failure(self) -> None:
        """Raise the first failed commit's error (the lowest shard)."""
        if self.failed:
            raise min(self.failed, key=lambda f: f[0])[1]


@dataclass
class _Pending:
    run: str
    shard: int
    cache_url: str
    future: concurrent.futures.Future
    commit: bool = True  # False: a check of samples added so far (reported only if it fails)


class BackgroundCommits:
    """One commit thread of this process and the commits it runs, by build run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = 0
        self._pending: list[_Pending] = []
        self._failures: collections.Counter[str] = collections.Counter()  # failed, not yet collected, by run
        self.commit_s = 0.0  # seconds inside commits (the work moved off the critical path)
        self.wait_s = 0.0  # seconds callers were blocked on commits (the part that was not hidden)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None or self._pid != os.getpid():  # a forked child has no thread of its parent's
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kd-commit")
            self._pid = os.getpid()
        return self._pool

    def _commit(self, writer: ShardWriter) -> None:
        t0 = time.perf_counter()
        try:
            writer.commit()
        finally:
            self.commit_s += time.perf_counter() - t0

    def _wait(self, futures: list[concurrent.futures.Future]) -> None:
        """Wait through Ctrl-C (``wait_through_interrupts``): a build's lease ends only after its last write."""
        if not futures:
            return
        t0 = time.perf_counter()
        try:
            wait_through_interrupts(futures)
        finally:
            self.wait_s += time.perf_counter() - t0

    def submit(self, run: str, shard: int, writer: ShardWriter) -> bool:
        """Commit ``writer`` (which gets no more samples) in the background, once the commit before
        it (of any run) is done; not at all (False) when a commit of ``run`` failed meanwhile."""
        with self._lock:
            running = [p.future for p in self._pending if not p.future.done()]
        self._wait(running)
        if self.has_failed(run):
            return False
        self._track(_Pending(run, shard, writer.cache.url, self._executor().submit(self._commit, writer)))
        return True

    def check(self, run: str, shard: int, writer: ShardWriter) -> None:
        """Check the samples added to ``writer`` so far in the background (``check_added``), so that its
        commit, the one nothing hides at the end of a build, does less."""
        future = self._executor().submit(writer.check_added)
        self._track(_Pending(run, shard, writer.cache.url, future, commit=False))

    def _track(self, pending: _Pending) -> None:
        with self._lock:
            self._pending.append(pending)

        def count_failure(future: concurrent.futures.Future) -> None:
            if future.exception() is not None:
                with self._lock:
                    self._failures[pending.run] += 1

        pending.future.add_done_callback(count_failure)

    def has_failed(self, run: str) -> bool:
        """Whether a commit of ``run`` failed (its report is still to collect): stop capturing.
        A dict lookup: the capture asks after every batch."""
        return self._failures.get(run, 0) > 0

    def collect(self, run: str, *, wait: bool = False) -> CommitReport:
        """Report (once) the commits of ``run`` that finished; with ``wait``, first wait for all of them."""
        with self._lock:
            mine = [p for p in self._pending if p.run == run]
        if wait:
            self._wait([p.future for p in mine if not p.future.done()])
        done = [p for p in mine if p.future.done()]
        gone = {id(p) for p in done}
        with self._lock:
            self._pending = [p for p in self._pending if id(p) not in gone]
        report = CommitReport()
        for p in sorted(done, key=lambda p: p.shard):
            error = p.future.exception()
            if error is None:
                if p.commit:
                    report.committed.append(p.shard)
            else:
                report.failed.append((p.shard, commit_error(p.shard, p.cache_url, error)))
        with self._lock:  # reported: these no longer stop the capture (the callback may still count one: 0 then)
            self._failures[run] -= len(report.failed)
            if not self._failures[run]:
                del self._failures[run]
        return report

    def stats(self) -> dict[str, float]:
        return {"commit_s": self.commit_s, "wait_s": self.wait_s}


def wait_through_interrupts(futures: list[concurrent.futures.Future]) -> None:
    """Wait for ``futures``; a Ctrl-C meanwhile is held and raised once they are done.

    A build interrupted once waits here for its running commit before its lease is released; a
    second Ctrl-C used to end that wait, so the lease went while the commit still wrote, and
    another builder could take the cache over mid-write. A commit is one shard's encode and write:
    seconds, so the wait is short. SIGINT is held by a handler installed for the wait (the main
    thread only: other threads get no signals), which leaves no window for a second Ctrl-C.
    """
    # Other threads get no signals; a process that ignores SIGINT (e.g. a background job of a
    # non-interactive shell, where Python starts with SIG_IGN) has no Ctrl-C to hold.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        concurrent.futures.wait(futures)
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if not held:
            print("kd: waiting for the running shard commit to finish before stopping "
                  "(seconds; the cache stays resumable)", file=sys.stderr, flush=True)
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        concurrent.futures.wait(futures)
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        if previous is signal.default_int_handler:
            raise KeyboardInterrupt
        if callable(previous):
            previous(signal.SIGINT, None)


COMMITS = BackgroundCommits()  # this process's (a dask worker's too): one engine, one commit thread


async def flush_run(run: str) -> dict[str, Any]:
    """``COMMITS.collect(run, wait=True)`` for ``Client.run`` on a dask worker, without blocking its
    event loop; the report as plain data (shard lists, failures as exceptions)."""
    report = await asyncio.get_running_loop().run_in_executor(None, functools.partial(COMMITS.collect, run, wait=True))
    return {"committed": report.committed, "failed": report.failed}
