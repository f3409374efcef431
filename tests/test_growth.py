"""A growing dataset reuses its caches (SPEC.md section 11): a build of a grown or edited dataset
captures only the samples its parent chain lacks, and the chain reads as one cache equal to a
full rebuild's. Tiny teacher, synthetic scenes, hf engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kd.cache_schema import CacheError, CachePathError, CacheReader, verify_cache
from kd.cli import app
from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.build import shard as shard_mod
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """24 training records; ``old`` = the first 20, ``mid`` = the first 22, ``grown`` = all 24."""
    d = tmp_path_factory.mktemp("growth")
    synthesize(d / "data", 10, seed=3)
    build_preset("vlm", "teacher", d / "teacher", seed=1)
    lines = (d / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 24
    for name, n in (("old", 20), ("mid", 22), ("grown", 24)):
        (d / "data" / f"{name}.jsonl").write_text("\n".join(lines[:n]) + "\n")
    changed = [json.loads(line) for line in lines]
    changed[3]["answer"] = "a different answer, so a changed sample"
    (d / "data" / "changed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
    (d / "data" / "shrunk.jsonl").write_text("\n".join(lines[1:]) + "\n")  # record 0 gone
    return d


def request(world: Path, data: str, out: Path, **kw) -> BuildRequest:
    base = dict(teacher=str(world / "teacher"), data=str(world / "data" / f"{data}.jsonl"), out=str(out),
                engine="hf", top_k=8, value_coding="fp32", hidden_layers=(1,), hidden_coding="fp32",
                attention_layers=(0,), attention_kind="both", shard_size=5, batch_size=1)
    base.update(kw)  # batch_size 1: each sample's numbers do not depend on its batch mates, so bits compare
    return BuildRequest(**base)


def ids_of(world: Path, data: str) -> list[str]:
    return [json.loads(line)["id"] for line in (world / "data" / f"{data}.jsonl").read_text().splitlines()]


@pytest.fixture
def captured(world, monkeypatch) -> list[str]:
    """Ids of every sample the teacher engine runs on (the self-check's capture included)."""
    seen: list[str] = []
    engine = shard_mod.warm_engine(request(world, "old", world), "hf")
    original = engine.capture

    def capture(records, spec):
        seen.extend(r["id"] if isinstance(r, dict) else r.sample_id for r in records)
        return original(records, spec)

    monkeypatch.setattr(engine, "capture", capture)
    return seen


@pytest.fixture(scope="module")
def full(world) -> dict[str, str]:
    """Full caches (no parent) of each dataset, in a root of their own."""
    return {name: build_cache(request(world, name, world / "full", reuse=False)).path
            for name in ("mid", "grown", "changed", "shrunk")}


def arrays(reader: CacheReader, sid: str) -> dict[str, np.ndarray]:
    s = reader.get(sid)
    return {"ids": s.ids, "logprobs": s.logprobs, "tail": s.tail_logmass, "targets": s.target_ids,
            "hidden": s.hidden[1], "t2v": s.attention_t2v[0], "full": s.attention_full[0],
            "meta": np.array([s.answer_start, s.seq_len]), "hashes": np.array([s.input_ids_hash, s.answer_ids_hash])}


def assert_same_dataset(chained: str, full_path: str) -> None:
    a, b = CacheReader(chained), CacheReader(full_path)
    assert len(a) == len(b) and sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in b.sample_ids:
        assert sid in a and a.capability(sid) == b.capability(sid)
        x, y = arrays(a, sid), arrays(b, sid)
        for name in y:
            np.testing.assert_array_equal(x[name], y[name], err_msg=f"{sid}/{name}")
    ids = b.sample_ids
    for name in ("num_tokens", "answer_ids_hash", "content_hash"):
        assert a.index_column(name, a.rows_of(ids)) == b.index_column(name, b.rows_of(ids)), name
    batch_a, batch_b = a.get_batch(ids), b.get_batch(ids)  # rows of both caches in one batch read
    np.testing.assert_array_equal(batch_a.logprobs, batch_b.logprobs)
    np.testing.assert_array_equal(batch_a.attention_full[0], batch_b.attention_full[0])


@pytest.fixture(scope="module")
def parent(world) -> str:
    return build_cache(request(world, "old", world / "caches")).path


def test_growth_captures_only_the_new_samples_and_reads_as_one_dataset(world, parent, full, captured):
    res = build_cache(request(world, "grown", world / "caches"))
    new = set(ids_of(world, "grown")) - set(ids_of(world, "old"))
    assert set(captured) == new and len(new) == 4  # the self-check ran on the new samples' first batch
    assert res.parent == Path(parent).name and res.reused_samples == 20 and res.samples == 24
    child = CacheReader(res.path)
    assert child.manifest.samples == 4 and child.manifest.parent.name == Path(parent).name
    assert [link.name for link in child.chain] == [Path(res.path).name, Path(parent).name]
    assert_same_dataset(res.path, full["grown"])
    # Content-addressed: the child's key is the whole dataset's, equal to the full build's.
    assert child.key == CacheReader(full["grown"]).key
    assert verify_cache(res.path).ok
    captured.clear()
    again = build_cache(request(world, "grown", world / "caches"))
    assert again.reused and again.path == res.path and again.samples == 24 and not captured


def grows_only(parent: str, tmp_path: Path) -> Path:
    """A root holding only a copy of ``parent`` (so no other child there is a better parent)."""
    root = tmp_path / "caches"
    shutil.copytree(parent, root / Path(parent).name)
    return root


def test_a_changed_record_is_recomputed_and_the_childs_version_is_read(world, parent, full, captured, tmp_path):
    old_ids = ids_of(world, "old")
    res = build_cache(request(world, "changed", grows_only(parent, tmp_path)))
    new = set(ids_of(world, "changed")) - set(old_ids)
    assert set(captured) == new | {old_ids[3]}
    child, before = CacheReader(res.path), CacheReader(parent)
    assert res.parent == Path(parent).name and child.manifest.samples == 5
    assert child.get(old_ids[3]).answer_ids_hash != before.get(old_ids[3]).answer_ids_hash
    assert_same_dataset(res.path, full["changed"])


def test_a_chain_of_three_reads_as_one_dataset(world, full, captured, tmp_path):
    root = tmp_path / "caches"
    first = build_cache(request(world, "old", root))
    second = build_cache(request(world, "mid", root))
    third = build_cache(request(world, "grown", root))
    assert second.parent == Path(first.path).name and third.parent == Path(second.path).name
    assert third.reused_samples == 22
    reader = CacheReader(third.path)
    assert [link.name for link in reader.chain] == [Path(p).name for p in (third.path, second.path, first.path)]
    assert [link.samples for link in reader.chain] == [2, 2, 20]
    assert_same_dataset(second.path, full["mid"])
    assert_same_dataset(third.path, full["grown"])
    assert verify_cache(third.path).ok
    # Every record was captured once over the three builds (plus each self-check's first batch).
    assert set(captured) == set(ids_of(world, "grown"))


def test_a_dropped_record_is_not_served(world, parent, full, captured, tmp_path):
    res = build_cache(request(world, "shrunk", grows_only(parent, tmp_path)))
    gone = ids_of(world, "old")[0]
    child = CacheReader(res.path)
    assert gone not in child and gone in CacheReader(parent) and child.manifest.parent.dropped_samples == 1
    assert_same_dataset(res.path, full["shrunk"])


def test_no_reuse_and_force_build_full_caches(world, parent, full, captured, tmp_path):
    root = grows_only(parent, tmp_path)
    child = build_cache(request(world, "grown", root))
    assert child.parent == Path(parent).name
    captured.clear()
    flat = build_cache(request(world, "grown", root, reuse=False))  # the sealed child becomes a full cache
    assert flat.path == child.path and flat.parent is None and not flat.reused and len(set(captured)) == 24
    assert CacheReader(flat.path).manifest.parent is None
    assert_same_dataset(flat.path, full["grown"])
    forced = build_cache(request(world, "mid", root, force=True))
    assert forced.parent is None and CacheReader(forced.path).manifest.samples == 22


def _chained_copy(world, parent, tmp_path) -> tuple[Path, Path]:
    root = grows_only(parent, tmp_path)
    child = Path(build_cache(request(world, "grown", root)).path)
    return root, child


@pytest.mark.parametrize("name", ["../escape", "/etc", "s3://bucket/cache", "a/b", "..", ".hidden", ""])
def test_a_parent_path_escaping_the_root_is_refused(world, parent, tmp_path, name):
    _, child = _chained_copy(world, parent, tmp_path)
    doc = json.loads((child / "manifest.json").read_text())
    doc["parent"]["name"] = name
    (child / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CachePathError, match="not a cache name under the same root"):
        CacheReader(str(child))


def test_a_symlinked_parent_is_refused(world, parent, tmp_path):
    root, child = _chained_copy(world, parent, tmp_path)
    moved = tmp_path / "elsewhere"
    (root / Path(parent).name).rename(moved)
    (root / Path(parent).name).symlink_to(moved)
    with pytest.raises(CachePathError, match="symbolic link"):
        CacheReader(str(child))


def test_a_missing_or_replaced_parent_is_an_error_naming_both_caches(world, parent, tmp_path):
    root, child = _chained_copy(world, parent, tmp_path)
    name = Path(parent).name
    (root / name).rename(root / "moved-away")
    with pytest.raises(CacheError, match=rf"{child.name}.*grows parent cache {name}.*no such cache"):
        CacheReader(str(child))
    assert not verify_cache(str(child)).ok
    with pytest.raises(CacheError, match=name):  # building again names the broken chain too
        build_cache(request(world, "grown", root))
    (root / "moved-away").rename(root / name)
    (root / name / "index.parquet").write_bytes(b"garbage")
    with pytest.raises(CacheError, match=rf"{child.name}.*{name}.*index.parquet: checksum"):
        CacheReader(str(child))


def test_a_parent_with_another_key_is_refused(world, parent, tmp_path):
    root, child = _chained_copy(world, parent, tmp_path)
    doc = json.loads((child / "manifest.json").read_text())
    doc["parent"]["key"] = "0" * 64
    (child / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="replaced"):
        CacheReader(str(child))


def test_ls_and_inspect_show_the_parent(world, parent, tmp_path):
    root, child = _chained_copy(world, parent, tmp_path)
    name = Path(parent).name
    res = runner.invoke(app, ["cache", "ls", str(root)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert f"{child.name} grows {name}: 4 new or changed samples here, 20 from the parent chain" in res.output
    listed = {e["name"]: e for e in json.loads(runner.invoke(app, ["cache", "ls", "--json", str(root)]).output)}
    assert listed[child.name]["parent"] == name and listed[child.name]["samples"] == 24
    assert listed[child.name]["own_samples"] == 4 and listed[name]["parent"] is None
    long = runner.invoke(app, ["cache", "ls", "--long", str(root)], env={"COLUMNS": "200"}).output
    assert f"parent   {name} (20 samples from it, 4 here)" in long
    shown = runner.invoke(app, ["cache", "inspect", str(child)], env={"COLUMNS": "200"}).output
    assert "lineage" in shown and f"parent     {name}" in shown
    assert "serves     24 samples: 4 here, 20 from the parent chain" in shown
    doc = json.loads(runner.invoke(app, ["cache", "inspect", "--json", str(child)]).output)
    assert [c["name"] for c in doc["chain"]] == [child.name, name] and doc["parent"]["samples"] == 20


def test_distill_over_a_chained_cache_names_every_cache_in_teachers_json(world, parent, tmp_path):
    from kd.pipeline.distill import distill, load_config

    root, child = _chained_copy(world, parent, tmp_path)
    student = build_preset("vlm", "student", tmp_path / "student")
    cfg = load_config(student=str(student), data=str(world / "data" / "grown.jsonl"), out=str(tmp_path / "run"),
                      quiet=True, teachers={"planning": str(child)},
                      train={"lr": 1e-3, "warmup_steps": 0, "grad_accum": 1, "batch_size": 4, "max_steps": 3})
    result = distill(cfg)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    teachers = json.loads((tmp_path / "run" / "teachers.json").read_text())
    caches = teachers["planning"]["caches"]
    assert [c["name"] for c in caches] == [child.name, Path(parent).name]
    assert caches[0]["key"] == CacheReader(str(child)).key and caches[1]["key"] == CacheReader(parent).key
    assert caches[0]["parent"] == Path(parent).name and teachers["planning"]["samples"] == 24


def test_a_v3_cache_without_content_hashes_still_reads_and_is_never_a_parent(world, parent, tmp_path):
    import pyarrow.parquet as pq

    from kd.cache_schema import checksum_bytes

    root = grows_only(parent, tmp_path)
    old = root / Path(parent).name
    table = pq.read_table(old / "index.parquet").drop(["content_hash"])  # the v3 index columns
    pq.write_table(table, old / "index.parquet", compression="zstd")
    data = (old / "index.parquet").read_bytes()
    doc = json.loads((old / "manifest.json").read_text())
    doc.pop("parent")
    doc.update(schema_version=3, index={"path": "index.parquet", "size": len(data), "xxh3_128": checksum_bytes(data)})
    (old / "manifest.json").write_text(json.dumps(doc))
    reader = CacheReader(str(old))
    assert reader.schema_version == 3 and reader.manifest.parent is None and len(reader) == 20
    assert set(reader.index_column("content_hash", np.arange(20))) == {""}
    assert verify_cache(str(old)).ok
    res = build_cache(request(world, "grown", root))  # a v4 build: other key inputs, so a full cache
    assert res.parent is None and CacheReader(res.path).manifest.samples == 24


def test_an_interrupted_child_build_resumes_with_the_parent_it_planned(world, parent, full, monkeypatch, tmp_path):
    from kd.pipeline.build import recipe as recipe_mod

    root = grows_only(parent, tmp_path)
    real = recipe_mod.run_jobs

    def first_shard_then_die(jobs, **kw):
        real(jobs[:1], **kw)
        raise RuntimeError("killed")

    monkeypatch.setattr(recipe_mod, "run_jobs", first_shard_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        build_cache(request(world, "grown", root, shard_size=2))
    monkeypatch.setattr(recipe_mod, "run_jobs", real)
    res = build_cache(request(world, "grown", root, shard_size=2))
    assert res.parent == Path(parent).name and res.shards_built == 1 and res.shards_total == 2
    assert_same_dataset(res.path, full["grown"])
