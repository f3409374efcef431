"""The build lease: exclusive, heartbeating, stale leases taken over, lost leases stop the seal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cache_helpers import build_cache, make_signals

from kd.cache_schema import CacheBuild, CacheLockedError, Location, SignalConfig
from kd.cache_schema.lease import LEASE_FILE, BuildLease, LeaseInfo, pid_alive

SIG = SignalConfig(logits="topk", top_k=4, value_coding="fp32")


def lease_doc(path: Path) -> dict:
    return json.loads((path / LEASE_FILE).read_text())


def write_lease(path: Path, *, host: str, pid: int, age: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    t = time.time() - age
    (path / LEASE_FILE).write_text(json.dumps({"owner": "other", "host": host, "pid": pid, "created": t, "heartbeat": t}))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid is free (and not reused within the test, in practice)
    assert not pid_alive(proc.pid)
    return proc.pid


def test_exclusive_then_released(tmp_path):
    loc = Location.from_url(str(tmp_path / "c"))
    with BuildLease(loc) as lease:
        doc = lease_doc(tmp_path / "c")
        assert doc["owner"] == lease.info.owner and doc["host"] == socket.gethostname()
        with pytest.raises(CacheLockedError, match=rf"{socket.gethostname()}:\d+ holds the build lease"):
            BuildLease(loc, wait_timeout=0).acquire()
        lease.check()
    assert not (tmp_path / "c" / LEASE_FILE).exists()


def test_released_on_exception(tmp_path):
    loc = Location.from_url(str(tmp_path / "c"))
    with pytest.raises(RuntimeError), BuildLease(loc):
        raise RuntimeError("boom")
    assert not (tmp_path / "c" / LEASE_FILE).exists()


def test_live_lease_of_this_host_is_not_stale(tmp_path):
    write_lease(tmp_path, host=socket.gethostname(), pid=os.getpid(), age=0)  # alive: this process
    with pytest.raises(CacheLockedError):
        BuildLease(Location.from_url(str(tmp_path)), wait_timeout=0).acquire()
    assert lease_doc(tmp_path)["owner"] == "other"


def test_dead_pid_lease_is_taken_over_at_once(tmp_path):
    write_lease(tmp_path, host=socket.gethostname(), pid=dead_pid(), age=0)
    lease = BuildLease(Location.from_url(str(tmp_path)), wait_timeout=0).acquire()
    try:
        assert lease_doc(tmp_path)["owner"] == lease.info.owner
    finally:
        lease.release()


def test_expired_heartbeat_of_another_host_is_taken_over(tmp_path):
    write_lease(tmp_path, host="some-other-host", pid=1, age=120)
    with BuildLease(Location.from_url(str(tmp_path)), ttl=30, wait_timeout=0) as lease:
        assert lease_doc(tmp_path)["owner"] == lease.info.owner


def test_fresh_lease_of_another_host_blocks(tmp_path):
    write_lease(tmp_path, host="some-other-host", pid=1, age=1)
    with pytest.raises(CacheLockedError, match="some-other-host:1"):
        BuildLease(Location.from_url(str(tmp_path)), ttl=30, wait_timeout=0).acquire()


def test_waiter_logs_and_proceeds_after_release(tmp_path):
    loc = Location.from_url(str(tmp_path))
    holder = BuildLease(loc).acquire()
    lines: list[str] = []
    got = threading.Event()

    def wait() -> None:
        with BuildLease(loc, log=lines.append, wait_timeout=60):
            got.set()

    t = threading.Thread(target=wait)
    t.start()
    for _ in range(200):  # until the waiter has said it waits
        if lines:
            break
        time.sleep(0.05)
    assert lines and "waiting for builder" in lines[0] and f":{holder.info.pid}" in lines[0]
    assert not got.is_set()
    holder.release()
    t.join(60)
    assert got.is_set()


def test_heartbeat_refreshes_and_detects_loss(tmp_path):
    loc = Location.from_url(str(tmp_path))
    with BuildLease(loc, ttl=0.3) as lease:
        first = lease_doc(tmp_path)["heartbeat"]
        for _ in range(100):
            if lease_doc(tmp_path)["heartbeat"] > first:
                break
            time.sleep(0.05)
        assert lease_doc(tmp_path)["heartbeat"] > first
        write_lease(tmp_path, host="thief", pid=7, age=0)  # someone took it over (we were "paused")
        with pytest.raises(CacheLockedError, match="lost the build lease.*thief:7"):
            lease.check()
    assert lease_doc(tmp_path)["host"] == "thief"  # release never removes another owner's lease


def test_torn_lease_file_waits_then_is_taken_over(tmp_path):
    (tmp_path / LEASE_FILE).write_text("{")
    with pytest.raises(CacheLockedError, match="unreadable"):
        BuildLease(Location.from_url(str(tmp_path)), wait_timeout=0).acquire()
    with BuildLease(Location.from_url(str(tmp_path)), ttl=0.2, wait_timeout=30) as lease:
        assert lease_doc(tmp_path)["owner"] == lease.info.owner


def test_lease_on_an_fsspec_filesystem():
    loc = Location.from_url("memory://kd-lease-test/c")
    with BuildLease(loc) as lease:
        assert LeaseInfo.parse(loc.read_bytes(LEASE_FILE)).owner == lease.info.owner
        with pytest.raises(CacheLockedError):
            BuildLease(loc, wait_timeout=0).acquire()
    assert not loc.exists(LEASE_FILE)


def test_seal_with_a_lost_lease_deletes_nothing(tmp_path):
    samples = [make_signals(f"s-{i}", 3 + i, SIG, seed=i) for i in range(4)]
    build: CacheBuild = build_cache(str(tmp_path), samples, SIG, shard_size=2, seal=False)
    stray = build.location.child("shards/00000-0123456789ab")
    stray.makedirs()
    lease = BuildLease(build.location).acquire()
    try:
        write_lease(Path(build.location.path), host="thief", pid=7, age=0)
        with pytest.raises(CacheLockedError, match="lost the build lease"):
            build.seal("test", lease=lease)
    finally:
        lease.release()
    assert stray.exists() and not build.sealed
    (Path(build.location.path) / LEASE_FILE).unlink()
    with BuildLease(build.location) as lease:
        build.seal("test", lease=lease)
    assert build.sealed and not stray.exists()


def test_seal_sweeps_only_its_own_names(tmp_path):
    samples = [make_signals(f"s-{i}", 3 + i, SIG, seed=i) for i in range(4)]
    build = build_cache(str(tmp_path), samples, SIG, shard_size=2, seal=False)
    root = Path(build.location.path)
    (root / "shards" / "00001-aaaaaaaaaaaa").mkdir()  # a killed attempt
    (root / "shards" / f".00001.commit.json.tmp-{'0' * 32}").write_text("x")  # a killed atomic write
    (root / f".index.parquet.tmp-{'1' * 32}").write_text("x")
    (root / "shards" / "notes.txt").write_text("not ours")
    build.seal("test")
    names = sorted(p.name for p in (root / "shards").iterdir())
    assert names == sorted([*(p.split("/")[1] for p in (e.path for e in build.committed().values())),
                            "00000.commit.json", "00001.commit.json", "notes.txt"])
    assert not list(root.glob(".*.tmp-*"))
