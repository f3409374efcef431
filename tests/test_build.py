"""Stage one end to end on tiny local models: reuse, resume, dask fan-out, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kd.cache_schema import CacheReader
from kd.cli import app
from kd.pipeline.build import recipe as recipe_mod
from kd.pipeline.build import shard as build_mod
from kd.pipeline.build import BuildRequest, build_cache, prepare, run_shard, ShardJob, asdict_request
from kd.pipeline.common.dataset import DatasetError
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("build")
    synthesize(d / "data", 12, seed=3)
    build_preset("vlm", "student", d / "teacher", seed=1)
    return d


def request(workdir: Path, out: Path, **kw) -> BuildRequest:
    base = dict(teacher=str(workdir / "teacher"), data=str(workdir / "data" / "train.jsonl"), out=str(out),
                engine="hf", top_k=8, value_coding="fp32", hidden_layers=(1,), hidden_coding="fp32", attention_layers=(0,),
                attention_kind="both", shard_size=5, batch_size=4)
    base.update(kw)
    return BuildRequest(**base)


def all_arrays(path: str) -> dict[str, dict[str, np.ndarray]]:
    r = CacheReader(path)
    out = {}
    for sid in r.sample_ids:
        s = r.get(sid)
        out[sid] = {"ids": s.ids, "logprobs": s.logprobs, "tail": s.tail_logmass, "targets": s.target_ids,
                    "hidden": s.hidden[1], "t2v": s.attention_t2v[0], "full": s.attention_full[0]}
    return out


def assert_same_cache(a: str, b: str) -> None:
    x, y = all_arrays(a), all_arrays(b)
    assert list(x) == list(y)
    for sid in x:
        for name in x[sid]:
            np.testing.assert_array_equal(x[sid][name], y[sid][name], err_msg=f"{sid}/{name}")


@pytest.fixture(scope="module")
def reference(workdir) -> str:
    res = build_cache(request(workdir, workdir / "ref"))
    assert not res.reused and res.shards_built == res.shards_total == 6
    return res.path


def test_build_contents_match_records(workdir, reference):
    r = CacheReader(reference)
    from kd.pipeline.common.dataset import load_records

    records = load_records(workdir / "data" / "train.jsonl")
    assert r.sample_ids == [rec.id for rec in records]
    for rec in records:
        s = r.get(rec.id)
        assert s.capability == rec.capability
        assert s.ids.shape == (s.num_tokens, 8)
        assert np.all(np.diff(s.logprobs, axis=1) <= 0)  # sorted descending
        np.testing.assert_allclose(s.attention_full[0].sum(axis=1), 1.0, atol=2e-3)  # fp16-coded maps


def test_manifest_records_teacher_depth_and_tokenizer(workdir, reference):
    """Students map layers and check tokenizers from the manifest alone, with no teacher at hand."""
    teacher = CacheReader(reference).manifest.teacher
    config = json.loads((workdir / "teacher" / "config.json").read_text())
    assert teacher["num_layers"] == config["text_config"]["num_hidden_layers"]
    assert len(teacher["tokenizer_sha256"]) == 64
    assert Path(teacher["model_dir"]) == (workdir / "teacher").resolve()


def test_same_request_reuses_sealed_cache_without_teacher(workdir, reference, monkeypatch):
    def no_engine(*a, **k):
        raise AssertionError("a teacher engine was started for a sealed cache")

    monkeypatch.setattr(recipe_mod, "warm_engine", no_engine)  # the self-check's
    monkeypatch.setattr(build_mod, "warm_engine", no_engine)  # the shards'

    res = build_cache(request(workdir, workdir / "ref"))
    assert res.reused and res.path == reference and res.shards_built == 0


def test_resume_after_partial_build_gives_same_arrays(workdir, reference):
    req = request(workdir, workdir / "resume")
    cache, records, engine = prepare(req)
    from kd.cache_schema import BuildPlan

    plan = BuildPlan.from_ids([r.id for r in records], req.shard_size)
    cache.start(plan)
    for shard in (0, 3):  # a build stopped after committing two shards
        run_shard(ShardJob(asdict_request(req), engine, cache.location.url, cache.inputs, cache.teacher, shard, plan.shards[shard]))
    cache.location.makedirs("shards/00001-deadbeef0000")  # a killed writer's leftover attempt
    res = build_cache(req)
    assert res.shards_built == 4 and res.shards_total == 6
    assert Path(res.path).name == Path(reference).name  # same inputs, same key
    assert not (Path(res.path) / "shards" / "00001-deadbeef0000").exists()
    assert_same_cache(res.path, reference)


def test_dask_two_workers_equals_in_process(workdir, reference):
    import os

    environ = dict(os.environ)
    res = build_cache(request(workdir, workdir / "dask", workers=2))
    assert_same_cache(res.path, reference)
    assert dict(os.environ) == environ  # distributed's OMP_NUM_THREADS=1 etc. must not leak to the caller


def test_key_changes_with_signals(workdir, reference):
    req = request(workdir, workdir / "ref", top_k=4)
    cache, _, _ = prepare(req)
    assert cache.name != Path(reference).name and not cache.sealed


def test_bad_dataset_writes_nothing(workdir, tmp_path):
    bad = workdir / "data" / "bad.jsonl"  # beside the images it refers to
    lines = (workdir / "data" / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"answer": ', '"answr": ')
    bad.write_text("\n".join(lines) + "\n{not json\n")
    out = tmp_path / "caches"
    with pytest.raises(DatasetError) as e:
        build_cache(request(workdir, out, data=str(bad)))
    assert "bad.jsonl:3" in str(e.value) and "answer" in str(e.value)
    assert f"bad.jsonl:{len(lines) + 1}" in str(e.value)
    assert not out.exists() or not any(out.iterdir())


def test_vllm_cannot_do_attention(workdir, tmp_path):
    with pytest.raises(ValueError, match="attention"):
        prepare(request(workdir, tmp_path, engine="vllm"))


def test_teacher_without_weights_is_refused(workdir, tmp_path):
    empty = tmp_path / "teacher"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        prepare(request(workdir, tmp_path, teacher=str(empty)))


def test_cli_build_inspect_verify_ls(workdir, reference, tmp_path):
    runner = CliRunner()
    cfg = tmp_path / "build.yaml"
    cfg.write_text(
        f"data: {workdir / 'data' / 'train.jsonl'}\nout: {tmp_path / 'caches'}\nengine: hf\ntop_k: 4\nshard_size: 8\n"
        f"teachers:\n  - model: {workdir / 'teacher'}\n    role: perception\n"
        f"  - model: {workdir / 'teacher'}\n    role: planning\n    top_k: 6\n"
    )
    res = runner.invoke(app, ["cache", "build", "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    built = json.loads(res.stdout)
    assert len(built) == 2 and built[0]["key"] != built[1]["key"]
    res = runner.invoke(app, ["cache", "ls", str(tmp_path / "caches"), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)) == 2
    res = runner.invoke(app, ["cache", "inspect", built[1]["path"], "--json"])
    info = json.loads(res.stdout)
    assert info["signals"]["top_k"] == 6 and info["n_samples"] == built[1]["samples"]
    assert runner.invoke(app, ["cache", "verify", built[0]["path"]]).exit_code == 0
    chunk = next(p for p in sorted(Path(built[0]["path"]).rglob("*")) if "/ids/c/" in str(p) and p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    res = runner.invoke(app, ["cache", "verify", built[0]["path"]])
    assert res.exit_code == 1 and "ids/c/" in res.output and "checksum" in res.output


def test_cli_reports_bad_input_cleanly(workdir, tmp_path):
    res = CliRunner().invoke(app, ["cache", "build", "--teacher", str(workdir / "teacher"), "--data",
                                   str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c"), "--engine", "hf"])
    assert res.exit_code == 2 and "missing.jsonl" in res.output


@pytest.mark.vllm
def test_vllm_cache_matches_hf_cache(workdir, tmp_path):
    pytest.importorskip("vllm")
    hf = build_cache(request(workdir, tmp_path / "c", attention_layers=(), engine="hf"))
    vl = build_cache(request(workdir, tmp_path / "c", attention_layers=(), engine="vllm"))
    assert hf.key != vl.key  # the engine is part of the key
    a, b = CacheReader(hf.path), CacheReader(vl.path)
    for sid in a.sample_ids:
        x, y = a.get(sid), b.get(sid)
        np.testing.assert_array_equal(x.target_ids, y.target_ids)
        assert x.answer_ids_hash == y.answer_ids_hash and x.input_ids_hash == y.input_ids_hash
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
        np.testing.assert_allclose(x.hidden[1], y.hidden[1], atol=1e-5)


def test_sampled_logits_build(workdir, tmp_path):
    res = build_cache(request(workdir, tmp_path, logits="sampled", sampled_draws=12, value_coding="fp32",
                              hidden_layers=(), attention_layers=()))
    r = CacheReader(res.path)
    assert r.signals.logits == "sampled" and r.signals.sampled_draws == 12
    for sid in r.sample_ids:
        s = r.get(sid)
        assert s.counts is not None and s.counts.shape == s.ids.shape
        np.testing.assert_array_equal(s.counts.sum(axis=1), 12)
        assert np.all((s.ids >= 0) == (s.counts > 0))  # padding ids carry no draws


def test_build_workers_find_records_by_id_and_name_a_missing_one(workdir):
    from kd.pipeline.common.dataset import load_records

    path = workdir / "data" / "train.jsonl"
    records = load_records(path, check_images=False)
    by_id = build_mod._RecordsById(records, str(path))
    order = [records[5].id, records[0].id, records[5].id]
    assert by_id.get(order) == [records[5], records[0], records[5]]
    with pytest.raises(KeyError, match=rf"'gone' of the build plan is not in {path}"):
        by_id.get([records[1].id, "gone"])
