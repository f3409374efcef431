"""Stage one on a real dask cluster: `dask scheduler` + two `dask worker` processes on loopback.

``kd cache build --scheduler tcp://127.0.0.1:PORT`` must write the same arrays as an in-process
build. Then a worker is SIGKILLed in the middle of a shard commit (its arrays written, its commit
not yet published). Commits run in each worker's commit thread behind the next shard's capture
(``kd.pipeline.build.commits``), so the shard's task may have returned already: either the
scheduler reruns the task that was running, or the driver finds the shard uncommitted once every
worker's commits are done and reruns it; in both cases on another worker, and the build still
seals a complete cache equal to the in-process one that ``verify`` passes, the dead attempt swept.

The kill is deterministic: a worker preload (written below, armed by a file) makes the first
worker that is about to publish a shard commit record its pid and stall, and the test kills
exactly that process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd.cache_schema import CacheReader, verify_cache
from kd.cli import app
from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.build.fanout import task_key
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset

BIN = Path(sys.executable).parent  # the same environment's `dask` and python for every process
pytestmark = pytest.mark.timeout(420)  # a hung cluster fails with a traceback and still tears down

PRELOAD = '''\
"""dask worker preload of tests/test_cluster.py: logs which process commits which shard; once
the test creates ARM, the first worker about to publish a shard commit records its pid and
stalls there until the test kills it."""
import os
import time

from kd.cache_schema import storage

DIR = os.environ["KD_TEST_CLUSTER_DIR"]
# dask may run a preload file more than once in a process: wrap the original method only once.
_write_atomic = storage.Location.__dict__.get("_kd_test_original", storage.Location.write_atomic)
storage.Location._kd_test_original = _write_atomic


def write_atomic(self, rel, data):
    if not rel.endswith(".commit.json"):
        return _write_atomic(self, rel, data)
    shard = int(rel.rsplit("/", 1)[-1].split(".")[0])
    if os.path.exists(os.path.join(DIR, "ARM")):
        try:
            os.close(os.open(os.path.join(DIR, "victim.lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another worker is (or was) the victim
            pass
        else:
            with open(os.path.join(DIR, "victim.tmp"), "w") as f:
                f.write(f"{os.getpid()} {shard}")
            os.rename(os.path.join(DIR, "victim.tmp"), os.path.join(DIR, "victim"))
            time.sleep(300)  # killed here
    _write_atomic(self, rel, data)
    with open(os.path.join(DIR, "commits.log"), "a") as f:
        f.write(f"{shard} {os.getpid()}\\n")


storage.Location.write_atomic = write_atomic


def dask_setup(worker):
    import kd.pipeline.build.recipe  # noqa: F401  (torch and transformers load before the first task)
'''


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate each process group we started (workers spawn children), then kill what remains."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # also any child left behind by a leader that exited
        except ProcessLookupError:
            pass
        p.wait()


def _wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args[:2]} exited with {p.returncode}; see its log in {p.log_path}")
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not after {timeout:.0f}s")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cluster")
    paths = synthesize(d / "data", 4, seed=3, splits=(1.0, 0.0, 0.0))  # 12 records: 4 shards of 3
    return {"dir": d, "train": paths["train"], "teacher": build_preset("vlm", "student", d / "teacher", seed=1)}


@pytest.fixture(scope="module")
def cluster(world):
    """Scheduler + 2 workers (nanny, 1 process x 1 thread each) as subprocesses; always torn down."""
    d = world["dir"] / "dask"
    d.mkdir()
    (d / "kd_test_preload.py").write_text(PRELOAD)
    env = {**os.environ, "KD_TEST_CLUSTER_DIR": str(d), "PYTHONUNBUFFERED": "1"}
    sched_file = d / "scheduler.json"
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(d / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        p = subprocess.Popen([str(BIN / "dask"), *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                             cwd=d, start_new_session=True)
        p.log_path = d / f"{name}.log"
        log.close()
        procs.append(p)
        return p

    try:
        # If this process dies without teardown, the idle scheduler exits and its workers follow it.
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(sched_file), "--idle-timeout", "300s")
        address = _wait_for(lambda: sched_file.exists() and json.loads(sched_file.read_text() or "{}").get("address"),
                            60, "scheduler start", procs)
        for i in range(2):
            start(f"worker{i}", "worker", address, "--name", f"w{i}", "--nworkers", "1", "--nthreads", "1",
                  "--no-dashboard", "--preload", str(d / "kd_test_preload.py"), "--local-directory", str(d / f"w{i}"),
                  "--death-timeout", "60s")
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield {"address": address, "dir": d, "procs": procs}
    finally:
        _stop(procs)


def request(world, out: Path, **kw) -> BuildRequest:
    base = {"teacher": str(world["teacher"]), "data": str(world["train"]), "out": str(out), "engine": "hf",
            "top_k": 8, "value_coding": "fp32", "hidden_layers": (1,), "hidden_coding": "fp32",
            "attention_layers": (0,), "attention_kind": "both", "shard_size": 3, "batch_size": 4}
    return BuildRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(world) -> str:
    return build_cache(request(world, world["dir"] / "ref")).path


def _commits(d: Path) -> list[tuple[int, int]]:
    log = d / "commits.log"
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []


def _worker_pids(address: str) -> set[int]:
    from distributed import Client

    with Client(address, timeout=60) as client:
        return {int(pid) for pid in client.run(os.getpid).values()}


def test_cli_build_on_a_scheduler_equals_in_process(world, cluster, reference):
    from test_build import assert_same_cache

    workers = _worker_pids(cluster["address"])
    assert len(workers) == 2 and os.getpid() not in workers
    res = CliRunner().invoke(app, ["cache", "build", "--teacher", str(world["teacher"]), "--data", str(world["train"]),
                                   "--out", str(world["dir"] / "via-cli"), "--engine", "hf", "--top-k", "8",
                                   "--value-coding", "fp32", "--hidden-layers", "1", "--hidden-coding", "fp32",
                                   "--attention-layers", "0", "--attention-kind", "both", "--shard-size", "3",
                                   "--batch-size", "4", "--scheduler", cluster["address"], "--json"])
    assert res.exit_code == 0, res.output
    built = json.loads(res.stdout)
    assert built["shards_built"] == built["shards_total"] == 4
    assert Path(built["path"]).name == Path(reference).name
    assert_same_cache(built["path"], reference)
    committed_by = {pid for _, pid in _commits(cluster["dir"])}
    assert committed_by and committed_by <= workers  # every shard was written by a worker process


def test_worker_killed_mid_shard_is_retried_elsewhere(world, cluster, reference):
    from test_build import assert_same_cache

    d = cluster["dir"]
    before = len(_commits(d))
    (d / "ARM").touch()
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(build_cache, request(world, world["dir"] / "killed", scheduler=cluster["address"]))
            victim = _wait_for(lambda: (d / "victim").exists() and (d / "victim").read_text(), 180,
                               "a worker stalled at a shard commit", cluster["procs"])
            pid, shard = map(int, victim.split())
            shards_dir = world["dir"] / "killed" / Path(reference).name / "shards"
            dead_attempts = {p.name for p in shards_dir.glob(f"{shard:05d}-*")}
            assert dead_attempts and not running.done()  # arrays written, commit not published
            os.kill(pid, signal.SIGKILL)
            res = running.result(timeout=300)
    finally:
        for name in ("ARM", "victim", "victim.lock"):
            (d / name).unlink(missing_ok=True)
    assert not res.reused and res.shards_total == 4
    commits = _commits(d)[before:]
    assert sorted(s for s, _ in commits) == [0, 1, 2, 3]  # each shard committed once: the victim's too
    assert [p for s, p in commits if s == shard] != [pid]  # ... by another worker process
    assert_same_cache(res.path, reference)
    report = verify_cache(res.path)
    assert report.ok, report.problems
    listed = {e.path.split("/", 1)[1] for e in CacheReader(res.path).manifest.shards}
    left = {p.name for p in (Path(res.path) / "shards").iterdir() if not p.name.endswith(".commit.json")}
    assert left == listed and not dead_attempts & left  # the killed worker's attempt was swept at the seal


def test_task_keys_name_the_cache_url():
    from kd.pipeline.build import ShardJob

    a = ShardJob({}, "hf", "/data/a/teacher-0123456789abcdef", {}, {}, 3, ["x"])
    b = ShardJob({}, "hf", "s3://bucket/b/teacher-0123456789abcdef", {}, {}, 3, ["x"])
    assert task_key(a) != task_key(b)  # same cache name, two roots: never one dask task
    assert task_key(a) == task_key(ShardJob({}, "hf", a.cache_url, {}, {}, 3, ["y"]))
    assert "teacher-0123456789abcdef" in task_key(a) and task_key(a).endswith("-00003")
