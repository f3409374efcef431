"""Shard commits behind the capture (kd/pipeline/build/commits.py): the cache they write is the
sequential build's bit for bit, in-process and on dask; they really run while the next shard is
captured; a failed one fails the build naming the shard and is not counted; the seal waits for
all of them; a builder killed inside one resumes to the same cache.

Nothing here times anything: overlap is shown by ordering (a commit that can finish only once
the next shard's capture has begun).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kd.cache_schema import CacheReader
from kd.cache_schema.writer import CacheBuild, CacheNoSpaceError, ShardWriter
from kd.pipeline.build import build_cache, prepare
from kd.pipeline.build import fanout
from kd.pipeline.build import recipe as recipe_mod
from kd.pipeline.build import shard as shard_mod
from kd.pipeline.build.commits import COMMITS, BackgroundCommits, CommitReport, ShardCommitError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kd_bench_faults", ROOT / "bench" / "faults.py")
bench = sys.modules.setdefault("kd_bench_faults", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)

SHARDS = 3  # bench.make_request: 9 samples, 3 a shard, batches of 2


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("commits")
    bench.setup(d)
    return d


@pytest.fixture(scope="module")
def sequential(work) -> bench.Reference:
    """The reference: every shard committed before the next one's capture starts (no overlap)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(recipe_mod, "run_jobs", functools.partial(fanout.run_jobs, background=False))
    try:
        res = build_cache(bench.make_request(work, work / "sequential"))
    finally:
        mp.undo()
    assert res.shards_total == SHARDS and res.shards_built == SHARDS
    return bench.Reference.load(res.path)


def shard_files(path: str) -> list[dict[str, tuple[int, str]]]:
    """Each shard's files with size and checksum, by path inside the shard: equal bytes, equal lists."""
    return [{name: (f.size, f.xxh3_128) for name, f in e.files.items()} for e in CacheReader(path).manifest.shards]


def assert_same_bytes(path: str, ref: bench.Reference) -> None:
    assert bench.check_final(ref, path) == []  # samples, every decoded array and the index, bit for bit
    assert shard_files(path) == shard_files(ref.path)  # and every stored file of every shard


def test_overlapped_build_equals_the_sequential_one_in_process_and_on_dask(work, sequential):
    here = build_cache(bench.make_request(work, work / "overlapped"))
    assert here.shards_built == SHARDS
    assert_same_bytes(here.path, sequential)
    on_dask = build_cache(bench.make_request(work, work / "dask", workers=2))
    assert on_dask.shards_built == SHARDS
    assert_same_bytes(on_dask.path, sequential)


def test_a_commit_runs_while_the_next_shard_is_captured(work, sequential, monkeypatch, tmp_path):
    """Shard 0's commit finishes only after shard 1's first sample was captured: a build whose commits
    do not overlap the capture would wait here until the timeout and fail."""
    next_captured = threading.Event()
    seen: dict[str, object] = {}
    real_add, real_commit = ShardWriter.add, ShardWriter.commit

    def add(self, sample, *a, **kw):
        if self.shard == 1:
            next_captured.set()
        return real_add(self, sample, *a, **kw)

    def commit(self):
        if self.shard == 0:
            seen["overlapped"] = next_captured.wait(timeout=30)
            seen["thread"] = threading.current_thread().name
        return real_commit(self)

    monkeypatch.setattr(ShardWriter, "add", add)
    monkeypatch.setattr(ShardWriter, "commit", commit)
    res = build_cache(bench.make_request(work, tmp_path / "caches"))
    assert seen == {"overlapped": True, "thread": seen["thread"]} and str(seen["thread"]).startswith("kd-commit")
    assert_same_bytes(res.path, sequential)


def test_a_failed_background_commit_fails_the_build_naming_the_shard(work, sequential, monkeypatch, tmp_path):
    real_commit = ShardWriter.commit

    def commit(self):
        if self.shard == 1:
            raise RuntimeError("the disk caught fire")
        return real_commit(self)

    monkeypatch.setattr(ShardWriter, "commit", commit)
    req = bench.make_request(work, tmp_path / "caches")
    with pytest.raises(ShardCommitError, match=r"shard 1 of .*: its commit failed: RuntimeError: the disk caught fire"):
        build_cache(req)
    build = prepare(req)[0]
    assert not build.sealed
    assert sorted(build.committed()) == [0]  # shard 1 is not counted, and no shard commits after it failed
    assert not COMMITS._pending  # the failed build waited for its other commits and left none behind
    monkeypatch.setattr(ShardWriter, "commit", real_commit)
    res = build_cache(req)
    assert res.shards_built == SHARDS - 1
    assert_same_bytes(res.path, sequential)


@pytest.mark.parametrize("check_every", [1, shard_mod.CHECK_EVERY], ids=["checked-during-capture", "checked-by-commit"])
def test_a_broken_sample_checked_in_the_background_fails_the_build_naming_it(work, sequential, monkeypatch, tmp_path,
                                                                           check_every):
    """Samples are checked in the commit thread (off the critical path): a batch's while the teacher captures a
    later one, the rest by the commit, still before anything of the shard is written."""
    from kd.pipeline.build.engines.hf_engine import HFEngine

    monkeypatch.setattr(shard_mod, "CHECK_EVERY", check_every)

    real_capture = HFEngine.capture

    def capture(self, batch, spec):
        out = real_capture(self, batch, spec)
        for s in out:
            if s.sample_id == sequential.ids[4]:  # shard 1's second sample
                s.logprobs[1, 0] = float("nan")
        return out

    committing: list[int] = []
    real_commit = ShardWriter.commit

    def commit(self):
        committing.append(self.shard)
        return real_commit(self)

    monkeypatch.setattr(HFEngine, "capture", capture)
    monkeypatch.setattr(ShardWriter, "commit", commit)
    req = bench.make_request(work, tmp_path / "caches")
    broken = rf"shard 1 of .*ValueError: sample '{sequential.ids[4]}': logprobs has NaN"
    with pytest.raises(ShardCommitError, match=broken):
        build_cache(req)
    build = prepare(req)[0]
    assert sorted(build.committed()) == [0] and not list(Path(build.location.path, "shards").glob("00001-*"))
    # Checked during the capture: shard 1's commit never starts; else its commit refuses the sample.
    assert committing == ([0] if check_every == 1 else [0, 1])


def test_a_full_disk_in_a_dask_workers_background_commit_fails_the_build(work, sequential, monkeypatch, tmp_path):
    """The worker processes inherit the fault point: the second array write of each fills the disk."""
    req = bench.make_request(work, tmp_path / "caches", workers=2)
    monkeypatch.setenv("KD_FAULT_POINT", "shard_write:2:enospc")
    with pytest.raises(CacheNoSpaceError, match=r"shards/0000[0-2]-[0-9a-f]{12}/.*no space left on device"):
        build_cache(req)
    build = prepare(req)[0]
    assert not build.sealed and not build.committed()
    monkeypatch.delenv("KD_FAULT_POINT")
    res = build_cache(req)
    assert res.shards_built == SHARDS
    assert_same_bytes(res.path, sequential)


def test_the_seal_waits_for_every_commit(work, sequential, monkeypatch, tmp_path):
    real_commit, real_seal = ShardWriter.commit, CacheBuild.seal
    at_seal: dict[str, object] = {}
    last_commit_done = threading.Event()

    def slow_last_commit(self):  # the last shard's commit is still writing when the capture is over
        if self.shard == SHARDS - 1:
            threading.Event().wait(0.5)
        entry = real_commit(self)
        if self.shard == SHARDS - 1:
            last_commit_done.set()
        return entry

    def seal(self, *a, **kw):
        at_seal["committed"] = sorted(self.committed())
        at_seal["last_done"] = last_commit_done.is_set()
        at_seal["pending"] = len(COMMITS._pending)
        return real_seal(self, *a, **kw)

    monkeypatch.setattr(ShardWriter, "commit", slow_last_commit)
    monkeypatch.setattr(CacheBuild, "seal", seal)
    res = build_cache(bench.make_request(work, tmp_path / "caches"))
    assert at_seal == {"committed": list(range(SHARDS)), "last_done": True, "pending": 0}
    assert_same_bytes(res.path, sequential)


RUNNER = """
import json, sys, threading
from kd.cache_schema.writer import ShardWriter
from kd.pipeline.build import BuildRequest, build_cache
# Shard 1's commit starts writing only once shard 2's capture has begun: the kill at shard 1's
# second array lands in a background commit while the teacher works on the next shard.
next_captured = threading.Event()
real_add, real_commit = ShardWriter.add, ShardWriter.commit
def add(self, sample, *a, **kw):
    if self.shard == 2:
        next_captured.set()
    return real_add(self, sample, *a, **kw)
def commit(self):
    if self.shard == 1 and not next_captured.wait(timeout=60):
        print("no overlap", flush=True)
        sys.exit(3)
    return real_commit(self)
ShardWriter.add, ShardWriter.commit = add, commit
d = json.loads(sys.argv[1])
d["hidden_layers"] = tuple(d["hidden_layers"]); d["attention_layers"] = tuple(d["attention_layers"])
print(json.dumps(build_cache(BuildRequest(**d)).to_dict()), flush=True)
"""


def test_a_kill_inside_a_background_commit_resumes_to_the_same_cache(work, sequential, tmp_path):
    import torch

    from kd.pipeline.build import asdict_request

    req = bench.make_request(work, tmp_path / "caches")
    arrays = sum(1 for p in Path(sequential.path, CacheReader(sequential.path).manifest.shards[0].path).iterdir()
                 if p.is_dir())
    env = {**os.environ, **bench.ENV, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "KD_FAULT_POINT": f"shard_write:{arrays + 2}"}  # shard 1's second array
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(asdict_request(req))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    build = prepare(req)[0]
    shards = Path(build.location.path, "shards")
    assert sorted(build.committed()) == [0] and list(shards.glob("00001-*"))  # killed mid-write of shard 1
    assert bench.check_partial(sequential, build.location.path) == []
    res = build_cache(req, lease_timeout=0)
    assert res.shards_built == SHARDS - 1
    assert_same_bytes(res.path, sequential)


def test_commit_reports_come_once_and_failures_stop_later_commits(tmp_path):
    class Writer:
        def __init__(self, shard, error=None, gate=None):
            self.shard, self.error, self.gate = shard, error, gate
            self.cache = type("Loc", (), {"url": str(tmp_path)})()
            self.committed = False

        def commit(self):
            if self.gate is not None:
                self.gate.wait(timeout=30)
            if self.error:
                raise self.error
            self.committed = True

    commits = BackgroundCommits()
    gate = threading.Event()
    first = Writer(0, gate=gate)
    assert commits.submit("run", 0, first)
    assert commits.collect("run").committed == []  # still running: nothing reported yet
    gate.set()
    assert commits.collect("run", wait=True).committed == [0] and first.committed
    assert commits.collect("run", wait=True).committed == []  # reported once
    assert commits.submit("run", 1, Writer(1, error=ValueError("sample 'x': broken")))
    later = Writer(2)
    assert not commits.submit("run", 2, later) and not later.committed  # the run failed: no commit after it
    assert commits.submit("other", 5, Writer(5))  # another build's run is not concerned
    report = commits.collect("run", wait=True)
    assert report.committed == [] and [s for s, _ in report.failed] == [1]
    with pytest.raises(ShardCommitError, match=r"shard 1 of .*: its commit failed: ValueError: sample 'x': broken"):
        report.raise_failure()
    assert commits.collect("other", wait=True).committed == [5]
    assert commits.stats()["commit_s"] > 0

    checked, broken = Writer(7), Writer(8)
    checked.check_added = lambda: None
    broken.check_added = lambda: (_ for _ in ()).throw(ValueError("sample 'y': NaN"))
    commits.check("checks", 7, checked)
    assert commits.collect("checks", wait=True) == CommitReport()  # a passed check is no commit
    commits.check("checks", 8, broken)
    report = commits.collect("checks", wait=True)
    assert report.committed == [] and [s for s, _ in report.failed] == [8]


def test_a_second_ctrl_c_does_not_abandon_a_running_commit():
    """Two SIGINTs while the build waits for its last commit: the wait goes on until the commit is
    done, and only then does the interrupt surface (so the lease is not released mid-write)."""
    commits = BackgroundCommits()
    release, finished = threading.Event(), threading.Event()

    class SlowWriter:
        cache = type("Cache", (), {"url": "memory://slow"})()

        def commit(self) -> None:
            release.wait(10)
            finished.set()

    main = threading.main_thread().ident

    def main_is_waiting() -> bool:
        """Whether the main thread is inside the commit wait (a SIGINT anywhere else would end the session)."""
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_name == "wait_through_interrupts":
                return True
            frame = frame.f_back
        return False

    def interrupt_twice_then_release() -> None:
        try:
            for _ in range(2):
                for _ in range(500):  # up to 10 s for the main thread to (re-)enter the wait
                    if main_is_waiting():
                        break
                    threading.Event().wait(0.02)
                else:
                    return  # never waiting: no signal sent, and the test fails below
                threading.Event().wait(0.1)
                os.kill(os.getpid(), signal.SIGINT)
            threading.Event().wait(0.1)
        finally:
            release.set()

    commits.submit("run", 0, SlowWriter())
    threading.Thread(target=interrupt_twice_then_release, daemon=True).start()
    # Python's own handler, whatever this process started with (a background job of a shell starts
    # with SIGINT ignored: test_an_ignored_ctrl_c_stays_ignored_during_the_wait).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            commits.collect("run", wait=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished.is_set()
    assert commits.collect("run").committed == [0]


def test_an_ignored_ctrl_c_stays_ignored_during_the_wait(capfd):
    """A process that ignores SIGINT (``cmd &`` in a script) waits for its commit as before: no
    interrupt surfaces afterwards and nothing is said about one."""
    release = threading.Event()

    class SlowWriter:
        cache = type("Cache", (), {"url": "memory://slow"})()

        def commit(self) -> None:
            release.wait(10)

    def interrupt_then_release() -> None:
        threading.Event().wait(0.3)
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(0.2)
        release.set()

    commits = BackgroundCommits()
    commits.submit("run", 0, SlowWriter())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        threading.Thread(target=interrupt_then_release, daemon=True).start()
        assert commits.collect("run", wait=True).committed == [0]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "waiting for the running shard commit" not in capfd.readouterr().err
