"""Caches on an S3-compatible object store (moto's server on loopback) through fsspec/s3fs.

Credentials and the endpoint come only from the usual AWS environment variables, as on a real
deployment: ``kd cache build --out s3://...``, ``ls``, ``inspect``, ``verify`` (a corrupted
object is named) and ``kd distill`` reading its teacher cache from the bucket; the secret key
never shows up in any output, log, run directory or cache object.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs", reason="the dev extra installs s3fs")
# moto's server runs as its own process: importing it here would import flask, whose context-local
# proxies break vLLM's start-up scan of sys.modules in every later test of this process.
MOTO_SERVER = Path(sys.executable).with_name("moto_server")

from kd.cli import app
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset

BUCKET = "kd-caches"
ROOT = f"s3://{BUCKET}/team/caches"
SECRET = "kd-test-secret-" + secrets.token_hex(8)  # never expected in any output


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; AWS_* variables point boto at it (no config files)."""
    import fsspec

    home = tmp_path_factory.mktemp("aws")
    assert MOTO_SERVER.exists(), "the dev extra installs moto[server]"
    host, port = "127.0.0.1", _free_port()
    server = subprocess.Popen([str(MOTO_SERVER), "-H", host, "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_http(f"http://{host}:{port}/", server)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "kd-test-key",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",  # botocore's standard endpoint override
            "AWS_CONFIG_FILE": str(home / "config"),  # no developer profile leaks in
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        fsspec.filesystem("s3").clear_instance_cache()
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            fsspec.filesystem("s3").clear_instance_cache()
            server.kill()
            server.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:  # any HTTP answer means it is serving
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto_server did not answer at {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("s3world")
    paths = synthesize(d / "data", 4, seed=3, splits=(1.0, 0.0, 0.0))
    return {"dir": d, "train": paths["train"],
            "teacher": build_preset("vlm", "teacher", d / "teacher", seed=1),
            "student": build_preset("vlm", "student", d / "student", seed=5)}


runner = CliRunner()


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog):
    caplog.set_level(logging.INFO)
    yield
    assert SECRET not in caplog.text


def kd(*args: str, code: int = 0) -> str:
    """Run the CLI in-process; its output must never carry the secret key."""
    res = runner.invoke(app, [str(a) for a in args])
    assert SECRET not in res.output
    assert res.exit_code == code, res.output
    return res.stdout


def kd_process(*args: str) -> subprocess.CompletedProcess:
    """Run ``kd`` as its own process: credentials reach it through the environment only."""
    env = {**os.environ, "COLUMNS": "500"}  # rich wraps long lines at 80 columns otherwise
    res = subprocess.run([str(Path(sys.executable).with_name("kd")), *map(str, args)], check=False,
                         capture_output=True, text=True, timeout=120, env=env)
    assert SECRET not in res.stdout + res.stderr
    return res


def build_args(world, out: str, *extra: str) -> list[str]:
    return ["cache", "build", "--teacher", world["teacher"], "--data", world["train"], "--out", out,
            "--engine", "hf", "--top-k", "8", "--value-coding", "fp32", "--hidden-layers", "1",
            "--hidden-coding", "fp32", "--attention-layers", "0", "--attention-kind", "both",
            "--shard-size", "5", "--batch-size", "4", "--json", *extra]


@pytest.fixture(scope="module")
def built(s3, world) -> dict:
    """A build stopped after one committed shard, resumed on two dask worker processes.

    The workers commit through their own S3 clients, so the driver's seal sees their commits
    only if its listings are not served from s3fs's listings cache.
    """
    from kd.cache_schema import BuildPlan
    from kd.pipeline.build import (
        BuildRequest,
        ShardJob,
        asdict_request,
        prepare,
        run_shard,
    )

    req = BuildRequest(teacher=str(world["teacher"]), data=str(world["train"]), out=ROOT, engine="hf", top_k=8,
                       value_coding="fp32", hidden_layers=(1,), hidden_coding="fp32", attention_layers=(0,),
                       attention_kind="both", shard_size=5, batch_size=4)
    cache, records, engine = prepare(req)
    plan = BuildPlan.from_ids([r.id for r in records], req.shard_size)
    cache.start(plan)
    run_shard(ShardJob(asdict_request(req), engine, cache.location.url, cache.inputs, cache.teacher, 1, plan.shards[1]))
    assert sorted(cache.committed()) == [1]
    return json.loads(kd(*build_args(world, ROOT, "--workers", "2")))


def test_build_on_s3_resumed_on_dask_equals_local_build_and_is_reused(s3, world, built, tmp_path):
    from test_build import assert_same_cache

    assert built["path"].startswith(ROOT + "/") and not built["reused"]
    assert built["shards_built"] == 2 and built["shards_total"] == 3  # resumed on 2 dask workers
    assert s3.exists(f"{built['path'][5:]}/manifest.json")
    local = json.loads(kd(*build_args(world, str(tmp_path))))
    assert local["key"] == built["key"]  # where a cache lives is no part of its identity
    assert_same_cache(built["path"], local["path"])
    again = json.loads(kd(*build_args(world, ROOT)))
    assert again["reused"] and again["path"] == built["path"]


def test_ls_inspect_verify_on_s3(s3, built):
    listed = kd_process("cache", "ls", ROOT, "--json")
    assert listed.returncode == 0, listed.stderr
    caches = json.loads(listed.stdout)
    assert [c["path"] for c in caches] == [built["path"]] and caches[0]["sealed"]
    assert caches[0]["samples"] == built["samples"] and caches[0]["key"] == built["key"]
    info = json.loads(kd("cache", "inspect", built["path"], "--json"))
    assert info["key"] == built["key"] and info["n_samples"] == built["samples"] and info["bytes_on_disk"] > 0
    assert "OK:" in kd("cache", "verify", built["path"])
    assert json.loads(kd("cache", "ls", f"s3://{BUCKET}/nothing-here", "--json")) == []


def test_verify_names_a_corrupted_object(s3, built):
    chunk = min(p for p in s3.find(built["path"][5:]) if "/ids/c/" in p)
    original = s3.cat_file(chunk)
    bad = bytearray(original)
    bad[len(bad) // 2] ^= 0xFF
    s3.pipe_file(chunk, bytes(bad))
    try:
        res = kd_process("cache", "verify", built["path"])
        assert res.returncode == 1 and f"s3://{chunk}: checksum mismatch" in res.stderr, res.stderr
    finally:
        s3.pipe_file(chunk, original)
    assert "OK:" in kd("cache", "verify", built["path"])


def test_distill_reads_teacher_cache_from_s3(s3, world, built, tmp_path):
    out = tmp_path / "run"
    summary = json.loads(kd("distill", "--student", world["student"], "--data", world["train"],
                            "--teacher", f"perception={built['path']}", "--out", out, "--json",
                            "--set", "train.max_steps=2", "--set", "train.batch_size=4",
                            "--set", "train.warmup_steps=0", "--set", "train.eval_every=0",
                            "--set", "train.save_every=0"))
    assert summary["steps"] == 2
    teachers = json.loads((out / "teachers.json").read_text())
    assert teachers["perception"]["url"] == built["path"] and teachers["perception"]["key"] == built["key"]
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_no_secret_in_the_cache_objects(s3, built):
    for path in s3.find(built["path"][5:]):
        assert SECRET.encode() not in s3.cat_file(path), path


def test_listings_see_objects_other_clients_wrote(s3):
    """Dask workers commit shards through their own clients; s3fs caches listings forever."""
    from kd.cache_schema.storage import Location

    loc = Location.from_url(f"s3://{BUCKET}/listing")
    other = type(s3)(skip_instance_cache=True)  # another process's client
    other.pipe_file(f"{BUCKET}/listing/shards/00000.commit.json", b"{}")
    assert loc.listdir("shards") == ["00000.commit.json"] and not loc.exists("manifest.json")
    other.pipe_file(f"{BUCKET}/listing/shards/00001.commit.json", b"{}")
    other.pipe_file(f"{BUCKET}/listing/manifest.json", b"{}")
    assert loc.listdir("shards") == ["00000.commit.json", "00001.commit.json"]
    assert loc.exists("manifest.json") and loc.exists("shards/00001.commit.json")
    assert set(loc.walk_files("shards")) == {"shards/00000.commit.json", "shards/00001.commit.json"}


def test_reader_storage_options_reach_the_zarr_arrays(s3, built, monkeypatch):
    """An endpoint given as a storage option (not in the environment) serves manifest and chunks alike."""
    import fsspec

    from kd.cache_schema import CacheReader

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fsspec.filesystem("s3").clear_instance_cache()  # no client made with the environment's endpoint
    try:
        reader = CacheReader(built["path"], storage_options={"endpoint_url": endpoint})
        sample = reader.get(reader.sample_ids[-1])
        assert sample.ids.shape == (sample.num_tokens, 8)
    finally:
        fsspec.filesystem("s3").clear_instance_cache()


def test_unreachable_endpoint_is_one_clean_error(s3, built, world, monkeypatch):
    import fsspec

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fsspec.filesystem("s3").clear_instance_cache()
    try:
        for command in (["cache", "inspect", built["path"]], ["cache", "ls", ROOT], ["cache", "verify", built["path"]],
                        build_args(world, ROOT)):
            res = runner.invoke(app, command)
            assert res.exit_code == 2 and "storage" in res.output, res.output
            assert "Traceback" not in res.output and SECRET not in res.output
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
