"""Crash-resume, concurrent builders and a full disk, on a tiny teacher (bench/faults.py, smaller).

Each killed builder is a real subprocess SIGKILLed at a named fault point (``KD_FAULT_POINT``);
its resume runs here with ``lease_timeout=0``, so the dead builder's lease must be taken over
at once. Results are compared with an uninterrupted build bit for bit.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd.cache_schema import CacheReader, storage
from kd.cache_schema import faults as fault_mod
from kd.cache_schema.lease import LEASE_FILE, BuildLease, LeaseInfo
from kd.cache_schema.writer import CacheNoSpaceError
from kd.pipeline.build import build_cache, prepare

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kd_bench_faults", ROOT / "bench" / "faults.py")
bench = sys.modules.setdefault("kd_bench_faults", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)



def kills(ref: bench.Reference) -> list[str]:
    """In a batch (shard 1), mid shard 1's write, last commit -> manifest, in the seal."""
    return ["batch:4", f"shard_write:{arrays_per_shard(ref) + 2}", "after_commit:3", "before_manifest:1"]


def arrays_per_shard(ref: bench.Reference) -> int:
    shard0 = CacheReader(ref.path).manifest.shards[0].path
    return sum(1 for p in Path(ref.path, shard0).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    bench.setup(d)
    return d


@pytest.fixture(scope="module")
def ref(work) -> bench.Reference:
    res = build_cache(bench.make_request(work, work / "ref"))
    assert res.shards_total == 3 and res.samples == 9
    return bench.Reference.load(res.path)


def test_kill_at_every_phase_then_resume_equals_uninterrupted(work, ref):
    requests = {point: bench.make_request(work, work / f"kill-{point.split(':')[0]}") for point in kills(ref)}
    procs = {point: bench.start_builder(req, point) for point, req in requests.items()}  # all at once: start cost overlaps
    for point, proc in procs.items():
        assert bench.wait_killed(proc) == -signal.SIGKILL, f"{point}: builder was not killed ({proc.stderr})"
    for point, req in requests.items():
        path = Path(prepare(req)[0].location.path)
        assert not (path / "manifest.json").exists(), point
        lease = LeaseInfo.parse((path / LEASE_FILE).read_bytes())  # the SIGKILLed builder's stale lease
        assert lease is not None and lease.pid == procs[point].pid, point
        if point.startswith("shard_write"):  # a half-written attempt dir exists, and no reader sees it
            attempts = [p for p in (path / "shards").iterdir() if p.is_dir()]
            assert len(attempts) > len(list(path.glob("shards/*.commit.json")))
        assert bench.check_partial(ref, str(path)) == [], point
        res = build_cache(req, lease_timeout=0)  # a dead builder's lease is taken over without waiting
        assert not res.reused
        assert bench.check_final(ref, res.path) == [], point
    assert (build_cache(requests["batch:4"]).reused)


def test_two_concurrent_builders_make_one_cache(work, ref, tmp_path):
    req = bench.make_request(work, tmp_path / "caches")
    path = Path(prepare(req)[0].location.path)
    args = ["--teacher", req.teacher, "--data", req.data, "--out", req.out, "--engine", "hf", "--top-k", "8",
            "--value-coding", "fp32", "--hidden-layers", "1", "--hidden-coding", "fp32", "--attention-layers", "0",
            "--attention-kind", "t2v", "--shard-size", "3", "--batch-size", "2", "--json"]
    env = {**os.environ, **bench.ENV}
    env.pop("KD_FAULT_POINT", None)
    gate = BuildLease(prepare(req)[0].location).acquire()  # hold the cache until both builders wait for it
    errs = [tmp_path / f"err{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "kd.cli", "cache", "build", *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=e.open("w"), text=True) for e in errs]
    try:
        deadline = time.monotonic() + 300  # a hang guard only
        while not all("waiting for builder" in e.read_text() for e in errs):
            assert all(p.poll() is None for p in procs), [e.read_text() for e in errs]
            assert time.monotonic() < deadline, [e.read_text() for e in errs]
            time.sleep(0.2)
    finally:
        gate.release()
    while any(p.poll() is None for p in procs):  # a reader polling the build sees only whole shards
        if (path / "plan.json").exists():
            assert bench.check_partial(ref, str(path)) == []
        time.sleep(0.1)
    results = [json.loads(p.communicate()[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.read_text() for e in errs]
    assert sorted(r["reused"] for r in results) == [False, True]
    assert sorted(r["shards_built"] for r in results) == [0, 3]
    assert results[0]["path"] == results[1]["path"] == str(path)
    assert bench.check_final(ref, str(path)) == []


def test_disk_full_mid_shard_then_rerun(work, ref, tmp_path, monkeypatch):
    req = bench.make_request(work, tmp_path / "caches")
    monkeypatch.setenv("KD_FAULT_POINT", f"shard_write:{arrays_per_shard(ref) + 2}:enospc")  # in shard 1's write
    fault_mod.reset()
    with pytest.raises(CacheNoSpaceError, match=r"shards/00001-[0-9a-f]{12}/.*no space left on device") as e:
        build_cache(req)
    assert e.value.errno == errno.ENOSPC and "rerun" in str(e.value)
    path = Path(prepare(req)[0].location.path)
    assert not (path / "manifest.json").exists() and not (path / LEASE_FILE).exists()
    commits = len(list(path.glob("shards/*.commit.json")))
    assert commits == 1 and len([p for p in (path / "shards").iterdir() if p.is_dir()]) == commits  # freed
    assert bench.check_partial(ref, str(path)) == []
    monkeypatch.delenv("KD_FAULT_POINT")
    res = build_cache(req)
    assert res.shards_built == 2
    assert bench.check_final(ref, res.path) == []


def test_disk_full_at_the_seal_then_rerun(work, ref, tmp_path, monkeypatch):
    req = bench.make_request(work, tmp_path / "caches")
    real = storage.write_atomic

    def full_at_manifest(fs, path, data):
        if path.endswith("manifest.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(fs, path, data)

    monkeypatch.setattr(storage, "write_atomic", full_at_manifest)
    with pytest.raises(CacheNoSpaceError, match=r"manifest\.json: no space left on device"):
        build_cache(req)
    path = Path(prepare(req)[0].location.path)
    assert not (path / "manifest.json").exists() and not (path / LEASE_FILE).exists()
    with pytest.raises(Exception, match="not sealed"):
        CacheReader(str(path))
    monkeypatch.setattr(storage, "write_atomic", real)
    res = build_cache(req)
    assert res.shards_built == 0 and not res.reused  # every shard was committed: only the seal reran
    assert bench.check_final(ref, res.path) == []
