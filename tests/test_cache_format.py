"""The cache format v1 (kd/cache_schema/SPEC.md): round trips, coding bounds, integrity, keys, stores."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cache_helpers import (
    PROMPT,
    build_cache,
    chunk_file,
    flip_byte,
    make_signals,
    read_manifest,
    rewrite_shard_array,
    same_entries_per_row,
    shard_dir,
    truncate,
    write_manifest,
)
from kd.cache_schema import (
    CacheCorruptError,
    CacheError,
    CachePathError,
    CacheReader,
    CacheUnsealedError,
    JoinedReader,
    SCHEMA_VERSION,
    SchemaVersionError,
    SignalConfig,
    cache_dir_name,
    cache_key,
    decode_logprobs,
    encode_logprobs,
    hash_ids,
    key_inputs,
    kl_topk_buckets,
    list_caches,
    verify_cache,
)
from kd.cache_schema.codecs import U8_PAD, decode_hidden, decode_tail, encode_hidden
from kd.cache_schema.id_coding import encode_ids
from kd.cache_schema.synthetic import teacher_like_topk

SPEC = Path(__file__).resolve().parents[1] / "kd" / "cache_schema" / "SPEC.md"
LENGTHS = [1, 7, 1, 300, 2, 64, 1]  # ragged, with 1-token answers, across 4 shards of 2


def bf16_cast(x: np.ndarray) -> np.ndarray:
    """Independent reference: torch's round-to-nearest-even float32 -> bfloat16 -> float32."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).to(torch.float32).numpy()


def dtype_cast(x: np.ndarray, coding: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return {"fp32": lambda: x, "fp16": lambda: x.astype(np.float16).astype(np.float32), "bf16": lambda: bf16_cast(x)}[coding]()


def has_ties(values: np.ndarray) -> bool:
    """Whether some row holds two equal adjacent values: entries whose ids a 16-bit coding reorders."""
    return bool((values[:, 1:] == values[:, :-1]).any())


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality including -inf and signed zeros (NaN never occurs in these tests)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def samples_for(sig: SignalConfig, lengths=LENGTHS, prefix: str = "s"):
    return [make_signals(f"{prefix}-{i}", n, sig, seed=100 + i) for i, n in enumerate(lengths)]


@pytest.fixture
def memory_root():
    root = f"memory://kd-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://"):]
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("coding", ["fp32", "fp16", "bf16"])
def test_exact_codings_round_trip_bit_exact(tmp_path, coding):
    sig = SignalConfig(top_k=8, value_coding=coding)
    samples = samples_for(sig)
    build = build_cache(str(tmp_path), samples, sig)
    reader = CacheReader(build.location.path)
    assert reader.sample_ids == [s.sample_id for s in samples] and len(reader) == len(samples)
    for i, s in enumerate(samples):
        got = reader.get(s.sample_id)
        assert got.num_tokens == s.num_tokens == LENGTHS[i]
        assert same_entries_per_row(got.ids, got.logprobs, s.ids) and got.ids.dtype == np.int32  # ties: canonical order
        if coding == "fp32" or not has_ties(dtype_cast(s.logprobs, coding)):
            assert np.array_equal(got.ids, s.ids)
        assert np.array_equal(got.target_ids, s.target_ids)
        assert bits_equal(got.logprobs, dtype_cast(s.logprobs, coding))
        assert np.isneginf(got.logprobs).sum() == np.isneginf(s.logprobs).sum() > 0  # row 0 has a -inf entry
        assert bits_equal(got.tail_logmass, dtype_cast(s.tail_logmass, coding))  # 16-bit codings: their own tail
        assert got.capability == f"cap-{i % 3}"
        assert (got.answer_start, got.seq_len) == (PROMPT, PROMPT + s.num_tokens)
        assert got.input_ids_hash == hash_ids(s.input_ids) and got.answer_ids_hash == hash_ids(s.target_ids)
        assert got.counts is None and got.hidden == {} and got.attention_t2v == {}
    assert [x.sample_id for x in reader.get_many(["s-3", "s-0"])] == ["s-3", "s-0"]
    assert reader.rows_of(["s-2", "nope", "s-0"]).tolist() == [2, -1, 0]
    assert "s-1" in reader and "nope" not in reader and 1 not in reader
    assert reader.capability("s-4") == "cap-1" and reader.index_column("answer_ids_hash", [3]) == [hash_ids(samples[3].target_ids)]
    with pytest.raises(KeyError, match="'nope' is not in cache"):
        reader.get_batch(["s-0", "nope"])
    assert verify_cache(build.location.path).ok


@pytest.mark.parametrize("logits", ["topk", "sampled"])
def test_get_batch_concatenates_samples_across_shards_and_chunks(tmp_path, monkeypatch, logits):
    """A batch read (any order, samples of several shards, rows crossing chunk boundaries) holds
    every sample's rows in request order and its maps flattened; ``sample(b)`` and ``get`` agree."""
    import kd.cache_schema.zarr_io as zarr_io

    monkeypatch.setattr(zarr_io, "CHUNK_BYTES", 1024)  # 256-row chunks: long samples span several
    sig = SignalConfig(logits=logits, top_k=8, value_coding="fp32", sampled_draws=8 if logits == "sampled" else 0,
                       hidden_layers=(1,), hidden_coding="fp32", attention_layers=(0, 2),
                       attention_kinds=("t2v", "full"), attention_coding="fp32")
    samples = samples_for(sig, [300, 5, 700, 2, 260, 40])
    reader = CacheReader(build_cache(str(tmp_path), samples, sig, shard_size=2).location.path)
    assert len(reader.manifest.shards) == 3
    order = [4, 0, 3, 2, 5, 1, 2]  # a repeat too
    batch = reader.get_batch([samples[i].sample_id for i in order])
    want = [samples[i] for i in order]
    assert batch.sample_ids == [s.sample_id for s in want] and list(batch.num_tokens) == [s.num_tokens for s in want]
    assert np.array_equal(batch.ids, np.concatenate([s.ids for s in want]))
    assert bits_equal(batch.logprobs, np.concatenate([s.logprobs for s in want]))
    assert bits_equal(batch.tail_logmass, np.concatenate([s.tail_logmass for s in want]))
    assert np.array_equal(batch.target_ids, np.concatenate([s.target_ids for s in want]))
    assert bits_equal(batch.hidden[1], np.concatenate([s.hidden[1] for s in want]))
    if logits == "sampled":
        assert np.array_equal(batch.counts, np.concatenate([s.counts for s in want]))
    for layer in (0, 2):
        assert bits_equal(batch.attention_t2v[layer], np.concatenate([s.attention_t2v[layer].ravel() for s in want]))
        assert bits_equal(batch.attention_full[layer], np.concatenate([s.attention_full[layer].ravel() for s in want]))
    for b, s in enumerate(want):
        one, alone = batch.sample(b), reader.get(s.sample_id)
        for got in (one, alone):
            assert got.sample_id == s.sample_id and np.array_equal(got.ids, s.ids)
            assert bits_equal(got.logprobs, s.logprobs) and bits_equal(got.hidden[1], s.hidden[1])
            assert bits_equal(got.attention_t2v[2], s.attention_t2v[2]) and bits_equal(got.attention_full[0], s.attention_full[0])
            assert (got.answer_start, got.seq_len) == (PROMPT, PROMPT + s.num_tokens)
    with pytest.raises(KeyError, match="nope"):
        reader.get_batch(["s-0", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        reader.get_batch([])
    assert reader.get_many([]) == []


def test_returned_arrays_are_owned_by_the_caller(tmp_path):
    sig = SignalConfig(top_k=4, value_coding="fp32", hidden_layers=(1,), hidden_coding="fp32")
    samples = samples_for(sig, [5, 3])
    reader = CacheReader(build_cache(str(tmp_path), samples, sig).location.path)
    first = reader.get("s-0")
    for arr in (first.ids, first.logprobs, first.tail_logmass, first.target_ids, first.hidden[1]):
        arr[...] = 0  # a caller mutating its copy must not change what the next read returns
    again = reader.get("s-0")
    assert np.array_equal(again.ids, samples[0].ids) and bits_equal(again.logprobs, samples[0].logprobs)
    assert bits_equal(again.hidden[1], samples[0].hidden[1])


def test_u8_kl_bound_on_teacher_like_topk(tmp_path):
    sig = SignalConfig(top_k=64, value_coding="u8")
    samples = [make_signals(f"s-{i}", n, sig, seed=i, neg_inf_every=0) for i, n in enumerate([2000, 1500, 1, 2500])]
    reader = CacheReader(build_cache(str(tmp_path), samples, sig).location.path)
    kls = []
    for s in samples:
        got = reader.get(s.sample_id)
        kls.append(kl_topk_buckets(s.logprobs, s.tail_logmass, got.logprobs, got.tail_logmass))
        folded = np.isneginf(got.logprobs)
        assert same_entries_per_row(got.ids, got.logprobs, np.where(folded, -1, s.ids))  # folded entries read id -1
        assert not np.array_equal(got.ids, np.where(folded, -1, s.ids)) or len(s.ids) == 1  # ties were reordered
        assert np.all(got.tail_logmass >= s.tail_logmass - 1e-6)  # folded mass went to the tail
        whole = np.concatenate([got.logprobs, got.tail_logmass[:, None]], axis=1).astype(np.float64)
        assert np.allclose(np.logaddexp.reduce(whole, axis=1), 0.0, atol=1e-5)  # entries + tail sum to one
    kl = np.concatenate(kls)
    assert kl.mean() <= 1e-4, kl.mean()
    assert np.quantile(kl, 0.99) <= 1e-3


def test_empty_answer_rejected_naming_the_sample(tmp_path):
    sig = SignalConfig(top_k=4)
    build = build_cache(str(tmp_path), samples_for(sig, [3]), sig, seal=False, commit_shards=[])
    empty = make_signals("the-empty-one", 3, sig, seed=0)
    empty.target_ids = empty.target_ids[:0]
    with pytest.raises(ValueError, match="the-empty-one.*empty answer"):
        build.shard_writer(0).add(empty, "cap")


@pytest.mark.parametrize("field", ["logprobs", "tail_logmass"])
def test_nan_teacher_outputs_rejected_naming_sample_field_and_token(tmp_path, field):
    sig = SignalConfig(top_k=4, value_coding="u8")
    build = build_cache(str(tmp_path), samples_for(sig, [3]), sig, seal=False, commit_shards=[])
    broken = make_signals("the-nan-one", 5, sig, seed=0)
    getattr(broken, field)[2] = np.nan
    with pytest.raises(ValueError, match=f"the-nan-one.*{field} has NaN .first at answer token 2"):
        build.shard_writer(0).add(broken, "cap")


def test_repeated_ids_in_a_row_rejected_naming_sample_token_and_id(tmp_path):
    sig = SignalConfig(top_k=4)
    build = build_cache(str(tmp_path), samples_for(sig, [3]), sig, seal=False, commit_shards=[])
    broken = make_signals("the-dup-one", 5, sig, seed=0)
    broken.ids[3, 2] = broken.ids[3, 0]
    with pytest.raises(ValueError, match=f"the-dup-one.*repeat token {broken.ids[3, 0]} at answer token 3"):
        build.shard_writer(0).add(broken, "cap")
    padded = make_signals("padded", 5, sig, seed=1)
    padded.ids[1, 2:] = -1  # padding repeats, ids do not
    build.shard_writer(0).add(padded, "cap")


@pytest.mark.parametrize("coding", ["fp32", "fp16", "bf16"])
def test_hidden_and_attention_round_trip(tmp_path, coding):
    sig = SignalConfig(top_k=4, value_coding="fp16", hidden_layers=(0, 3), hidden_coding=coding,
                       attention_layers=(2, 5), attention_kinds=("t2v", "full"), attention_coding=coding)
    samples = samples_for(sig, [1, 9, 4, 1, 6])
    build = build_cache(str(tmp_path), samples, sig)
    reader = CacheReader(build.location.path)
    for s in samples:
        got = reader.get(s.sample_id)
        assert sorted(got.hidden) == [0, 3] and sorted(got.attention_t2v) == sorted(got.attention_full) == [2, 5]
        for layer in (0, 3):
            assert bits_equal(got.hidden[layer], dtype_cast(s.hidden[layer], coding))
        for layer in (2, 5):
            assert got.attention_t2v[layer].shape == (s.num_tokens, 5)
            assert got.attention_full[layer].shape == (s.num_tokens, len(s.input_ids))
            assert bits_equal(got.attention_t2v[layer], dtype_cast(s.attention_t2v[layer], coding))
            assert bits_equal(got.attention_full[layer], dtype_cast(s.attention_full[layer], coding))
    idx = reader.index.to_pydict()
    # The flat layout: each sample's block starts where the previous one of its shard ended.
    for shard in set(idx["shard"]):
        rows = [i for i, sh in enumerate(idx["shard"]) if sh == shard]
        ends = [0] + [idx["attn_full_start"][i] + idx["num_tokens"][i] * idx["attn_full_keys"][i] for i in rows[:-1]]
        assert [idx["attn_full_start"][i] for i in rows] == ends
    assert set(idx["attn_t2v_keys"]) == {5}
    assert verify_cache(build.location.path).ok


def test_sampled_mode_with_counts(tmp_path):
    sig = SignalConfig(logits="sampled", top_k=12, sampled_draws=12, value_coding="bf16")
    samples = samples_for(sig, [1, 5, 30])
    reader = CacheReader(build_cache(str(tmp_path), samples, sig).location.path)
    for s in samples:
        got = reader.get(s.sample_id)
        assert got.counts is not None and got.counts.dtype == np.uint16
        assert np.array_equal(got.counts, s.counts) and np.array_equal(got.ids, s.ids)
        assert np.all((got.ids == -1) == np.isneginf(got.logprobs)) and np.all(got.counts[got.ids == -1] == 0)
        assert bits_equal(got.logprobs, bf16_cast(s.logprobs))
    bad = make_signals("bad-9", 2, sig, seed=1)
    bad.counts = None
    with pytest.raises(ValueError, match="bad-9.*counts"):
        build_cache(str(tmp_path / "other"), [bad], sig)
    with pytest.raises(ValueError, match="u8"):
        SignalConfig(logits="sampled", top_k=4, value_coding="u8")


# ------------------------------------------------------------------------------- integrity


@pytest.fixture
def fp16_cache(tmp_path) -> str:
    sig = SignalConfig(top_k=8, value_coding="fp16", hidden_layers=(1,))
    return build_cache(str(tmp_path), samples_for(sig), sig).location.path


def test_flipped_chunk_byte_detected_by_verify_and_refused_on_read(fp16_cache):
    target = chunk_file(fp16_cache, "logprobs")
    flip_byte(target, 20)
    report = verify_cache(fp16_cache)
    assert not report.ok and len(report.problems) == 1
    assert str(target) in report.problems[0] and "checksum" in report.problems[0]
    reader = CacheReader(fp16_cache)  # the index is intact: opening works, the read refuses
    with pytest.raises(CacheCorruptError, match="logprobs"):
        reader.get("s-0")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_chunk_detected_and_refused(fp16_cache, damage):
    target = chunk_file(fp16_cache, "tail_logmass")
    if damage == "truncate":
        truncate(target, os.path.getsize(target) // 2)
    else:
        target.unlink()  # zarr alone would read the chunk as zeros (its fill value)
    report = verify_cache(fp16_cache)
    assert not report.ok and any(str(target) in p for p in report.problems)
    with pytest.raises(CacheCorruptError, match="tail_logmass"):
        CacheReader(fp16_cache).get("s-0")


def test_unlisted_chunk_file_refused(fp16_cache):
    extra = shard_dir(fp16_cache) / "logprobs" / "c" / "99" / "0"
    extra.parent.mkdir(parents=True)
    extra.write_bytes(b"stray")
    report = verify_cache(fp16_cache)
    assert not report.ok and "not listed" in report.problems[0] and "c/99/0" in report.problems[0]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_index_refused_at_open(fp16_cache, damage):
    index = Path(fp16_cache, "index.parquet")
    flip_byte(index, 100) if damage == "flip" else truncate(index, 50)
    with pytest.raises(CacheCorruptError, match="index.parquet"):
        CacheReader(fp16_cache)
    report = verify_cache(fp16_cache)
    assert not report.ok and "index.parquet" in report.problems[0]


def test_damaged_array_metadata_refused(fp16_cache):
    flip_byte(shard_dir(fp16_cache) / "ids" / "zarr.json", 30)
    with pytest.raises(CacheCorruptError, match="ids/zarr.json"):
        CacheReader(fp16_cache).get("s-0")
    assert any("ids/zarr.json" in p for p in verify_cache(fp16_cache).problems)


@pytest.mark.parametrize("lie", ["total_samples", "total_tokens", "shard_samples", "shard_tokens"])
def test_manifest_that_lies_about_counts_refused(fp16_cache, lie):
    doc = read_manifest(fp16_cache)
    if lie == "total_samples":
        doc["counts"]["samples"] += 1
    elif lie == "total_tokens":
        doc["counts"]["tokens"] -= 1
    elif lie == "shard_samples":  # consistent with the total, but not with the index
        doc["counts"]["samples"] += 1
        doc["shards"][0]["samples"] += 1
    else:
        doc["counts"]["tokens"] += 4
        doc["shards"][1]["tokens"] += 4
    write_manifest(fp16_cache, doc)
    with pytest.raises(CacheCorruptError):
        CacheReader(fp16_cache)
    assert not verify_cache(fp16_cache).ok


def test_unsealed_cache_refused_unless_allowed(tmp_path):
    sig = SignalConfig(top_k=4, value_coding="u8")
    samples = samples_for(sig)  # 4 shards of 2, 2, 2, 1 samples
    build = build_cache(str(tmp_path), samples, sig, commit_shards=[0, 2], seal=False)
    with pytest.raises(CacheUnsealedError, match="not sealed"):
        CacheReader(build.location.path)
    assert not verify_cache(build.location.path).ok
    partial = CacheReader(build.location.path, allow_unsealed=True)
    assert partial.manifest is None and partial.sample_ids == ["s-0", "s-1", "s-4", "s-5"]
    got = partial.get("s-4")
    assert np.array_equal(got.target_ids, samples[4].target_ids)
    with pytest.raises(KeyError, match="s-2"):
        partial.get("s-2")
    assert [c["sealed"] for c in list_caches(str(tmp_path))] == [False]


def test_a_reader_pickles_as_what_opened_it(tmp_path):
    """Data-loader workers under spawn / forkserver (Python 3.14's default) get the dataset pickled:
    a reader travels as its url and options and reopens, checks included, with an empty LRU."""
    sig = SignalConfig(top_k=4, hidden_layers=(1,))
    samples = samples_for(sig)
    sealed = CacheReader(build_cache(str(tmp_path / "sealed"), samples, sig).location.path, cache_bytes=1 << 20)
    before = sealed.get_batch(["s-5", "s-0", "s-3"])
    copy = pickle.loads(pickle.dumps(sealed))
    assert copy._lru.used == 0 and copy._lru.budget == 1 << 20 and copy.key == sealed.key
    after = copy.get_batch(["s-5", "s-0", "s-3"])
    assert after.sample_ids == before.sample_ids and np.array_equal(after.ids, before.ids)
    assert np.array_equal(after.hidden[1], before.hidden[1]) and after.answer_ids_hash == before.answer_ids_hash
    # An unsealed cache read as it was: a reopening that sees other shards refuses to pass for the same reader.
    build = build_cache(str(tmp_path / "partial"), samples, sig, commit_shards=[0], seal=False)
    state = pickle.dumps(CacheReader(build.location.path, allow_unsealed=True))
    writer = build.shard_writer(1)
    for s in samples[2:4]:
        writer.add(s, "cap")
    writer.commit()
    with pytest.raises(CacheError, match="reopened with 4 samples"):
        pickle.loads(state)


def test_seal_is_idempotent_and_keeps_the_sealed_shards(tmp_path):
    sig = SignalConfig(top_k=4)
    samples = samples_for(sig, [3, 4, 5])
    build = build_cache(str(tmp_path), samples, sig)
    before = read_manifest(build.location.path)
    writer = build.shard_writer(0)  # a straggling duplicate of shard 0 commits after the seal
    for s in samples[:2]:
        writer.add(s, "cap")
    writer.commit()
    build.seal("test")
    assert read_manifest(build.location.path) == before
    assert verify_cache(build.location.path).ok


def test_schema_version_mismatch(fp16_cache, tmp_path):
    doc = read_manifest(fp16_cache)
    doc["schema_version"] = 9
    write_manifest(fp16_cache, doc)
    with pytest.raises(SchemaVersionError, match="schema_version 9"):
        CacheReader(fp16_cache)
    assert "schema_version" in verify_cache(fp16_cache).problems[0]
    assert "schema_version" in list_caches(str(Path(fp16_cache).parent))[0]["error"]


@pytest.mark.parametrize("where", ["shard_dotdot", "shard_absolute", "file_dotdot", "file_absolute"])
def test_path_escape_in_manifest_refused(fp16_cache, where):
    doc = read_manifest(fp16_cache)
    shard = doc["shards"][0]
    if where == "shard_dotdot":
        shard["path"] = "../elsewhere"
    elif where == "shard_absolute":
        shard["path"] = "/etc"
    else:
        name = next(iter(shard["files"]))
        shard["files"]["../../x" if where == "file_dotdot" else "/etc/passwd"] = shard["files"].pop(name)
    write_manifest(fp16_cache, doc)
    with pytest.raises(CachePathError):
        CacheReader(fp16_cache)
    assert not verify_cache(fp16_cache).ok


def test_symlinked_shard_directory_refused(fp16_cache, tmp_path):
    real = shard_dir(fp16_cache, 1)
    moved = tmp_path / "outside"
    shutil.move(str(real), moved)
    real.symlink_to(moved, target_is_directory=True)
    with pytest.raises(CachePathError, match="symbolic link"):
        CacheReader(fp16_cache).get("s-2")
    assert any("symbolic link" in p for p in verify_cache(fp16_cache).problems)


# ------------------------------------------------------------------------------- SPEC.md


def spec_example_code() -> str:
    text = SPEC.read_text()
    section = text[text.index("## Reading without kd"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "SPEC.md: no python example under 'Reading without kd'"
    return match.group(1)


def test_spec_example_uses_only_plain_libraries():
    modules = set()
    for node in ast.walk(ast.parse(spec_example_code())):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules <= {"json", "zarr", "pyarrow", "numpy"}, modules


@pytest.mark.parametrize("coding", ["fp32", "fp16", "bf16", "u8"])
def test_spec_example_reads_what_kd_reads(tmp_path, coding):
    sig = SignalConfig(top_k=16, value_coding=coding)
    path = build_cache(str(tmp_path), samples_for(sig), sig).location.path
    namespace: dict = {"__name__": "spec_example"}
    exec(compile(spec_example_code(), str(SPEC), "exec"), namespace)
    reader = CacheReader(path)
    for sid in ("s-0", "s-3", "s-6"):
        ids, logprobs, tail = namespace["read_topk"](path, sid)
        got = reader.get(sid)
        assert np.array_equal(ids, got.ids) and bits_equal(logprobs, got.logprobs) and bits_equal(tail, got.tail_logmass)


def test_spec_names_every_array_and_index_column():
    from kd.cache_schema.writer import INDEX_SCHEMA

    text = SPEC.read_text()
    for name in INDEX_SCHEMA.names + ["target_ids", "logprob_ref", "tail_logmass", "counts", "hidden_L", "attn_t2v_L",
                                      "attn_full_L", "crc32c", "xxh3_128", "schema_version", "sealed", "key_inputs"]:
        assert f"`{name}" in text, name


# ------------------------------------------------------------------------------- keys


BASE = dict(teacher={"name": "Org/T", "revision": "abc"}, tokenizer_hash="tok", template_hash="tpl",
            dataset_fingerprint="data", signals=SignalConfig(top_k=64, value_coding="fp16", hidden_layers=(4,)),
            engine={"kind": "vllm", "dtype": "bfloat16"})

CHANGES = {
    "teacher": dict(teacher={"name": "Org/T", "revision": "abd"}),
    "tokenizer": dict(tokenizer_hash="tok2"),
    "template": dict(template_hash="tpl2"),
    "dataset": dict(dataset_fingerprint="data2"),
    "k": dict(signals=SignalConfig(top_k=32, value_coding="fp16", hidden_layers=(4,))),
    "coding": dict(signals=SignalConfig(top_k=64, value_coding="u8", hidden_layers=(4,))),
    "hidden_coding": dict(signals=SignalConfig(top_k=64, value_coding="fp16", hidden_layers=(4,), hidden_coding="bf16")),
    "layers": dict(signals=SignalConfig(top_k=64, value_coding="fp16", hidden_layers=(4, 8))),
    "attention": dict(signals=SignalConfig(top_k=64, value_coding="fp16", hidden_layers=(4,), attention_layers=(1,),
                                           attention_kinds=("t2v",))),
    "engine": dict(engine={"kind": "vllm", "dtype": "float16"}),
}


def test_key_is_deterministic_and_dict_order_irrelevant():
    key = cache_key(key_inputs(**BASE))
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert cache_key(key_inputs(**BASE)) == key
    shuffled = dict(BASE, teacher={"revision": "abc", "name": "Org/T"}, engine={"dtype": "bfloat16", "kind": "vllm"})
    assert cache_key(key_inputs(**shuffled)) == key
    inputs = key_inputs(**BASE)
    assert cache_key(dict(reversed(list(inputs.items())))) == key
    assert cache_dir_name(inputs) == f"Org-T-{key[:16]}"


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_of_key_inputs_changes_the_key(change):
    assert cache_key(key_inputs(**{**BASE, **CHANGES[change]})) != cache_key(key_inputs(**BASE))


def test_key_documented_derivation():
    import hashlib

    inputs = key_inputs(**BASE)
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert cache_key(inputs) == hashlib.sha256(canonical).hexdigest()
    assert inputs["schema_version"] == SCHEMA_VERSION == 6 and inputs["signals"]["hidden_layers"] == [4]


def test_empty_key_input_refused():
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        key_inputs(**{**BASE, "dataset_fingerprint": ""})


# ------------------------------------------------------------------------------- stores and joins


def test_memory_url_write_read_verify_list(memory_root):
    sig = SignalConfig(top_k=8, value_coding="u8", hidden_layers=(2,), hidden_coding="bf16")
    samples = samples_for(sig, [3, 1, 5])
    build = build_cache(memory_root, samples, sig)
    url = build.location.url
    assert url.startswith("memory://")
    reader = CacheReader(url)
    for s in samples:
        got = reader.get(s.sample_id)
        assert np.array_equal(got.target_ids, s.target_ids) and bits_equal(got.hidden[2], bf16_cast(s.hidden[2]))
    report = verify_cache(url)
    assert report.ok and report.files_checked > 10
    (listed,) = list_caches(memory_root)
    assert listed["sealed"] and listed["samples"] == 3 and listed["tokens"] == 9 and listed["key"] == reader.key
    fs = fsspec.filesystem("memory")
    chunk = f"{build.location.path}/{read_manifest_fs(fs, build.location.path)['shards'][0]['path']}/target_ids/c/0"
    data = bytearray(fs.cat_file(chunk))
    data[5] ^= 1
    fs.pipe_file(chunk, bytes(data))
    assert not verify_cache(url).ok
    with pytest.raises(CacheCorruptError):
        CacheReader(url).get("s-0")


def read_manifest_fs(fs, path: str) -> dict:
    return json.loads(fs.cat_file(f"{path}/manifest.json"))


def test_joined_reader_across_two_caches(tmp_path):
    sig_a = SignalConfig(top_k=8, value_coding="fp16")
    sig_b = SignalConfig(top_k=4, value_coding="u8", hidden_layers=(1,))
    a = samples_for(sig_a, [3, 4, 5, 6])
    b = [make_signals(f"s-{i}", n, sig_b, seed=7 + i) for i, n in [(3, 6), (1, 4), (2, 5), (9, 2)]]
    path_a = build_cache(str(tmp_path), a, sig_a, teacher="Org/A").location.path
    path_b = build_cache(str(tmp_path), b, sig_b, teacher="Org/B").location.path
    assert path_a != path_b
    joined = JoinedReader({"a": CacheReader(path_a), "b": CacheReader(path_b)})
    assert joined.sample_ids == ["s-1", "s-2", "s-3"]  # the first cache's order, ids in both
    for got in joined.get_many(joined.sample_ids):
        assert set(got) == {"a", "b"} and got["a"].sample_id == got["b"].sample_id
        assert got["a"].ids.shape[1] == 8 and got["b"].ids.shape[1] == 4 and 1 in got["b"].hidden
    by_b = {s.sample_id: s for s in b}
    assert np.array_equal(joined.get("s-2")["b"].target_ids, by_b["s-2"].target_ids)
    with pytest.raises(ValueError):
        JoinedReader({})


# ------------------------------------------------------------------------------- codec properties

neg_inf_or_logprob = st.one_of(st.just(-np.inf), st.floats(-200.0, 0.0, width=32))


def logprob_rows(max_k: int = 16):
    return st.tuples(st.integers(1, 12), st.integers(1, max_k)).flatmap(
        lambda nk: hnp.arrays(np.float32, nk, elements=neg_inf_or_logprob))


@settings(max_examples=150, deadline=None)
@given(lp=logprob_rows(), coding=st.sampled_from(["fp32", "fp16", "bf16"]))
def test_exact_codings_are_lossless_for_their_dtype(lp, coding):
    tail = np.full(lp.shape[0], -3.0, np.float32)
    enc = encode_logprobs(lp, tail, coding)
    assert bits_equal(decode_logprobs(enc, coding), dtype_cast(lp, coding))
    assert bits_equal(decode_tail(enc["tail_logmass"], coding), dtype_cast(tail, coding))


@settings(max_examples=100, deadline=None)
@given(h=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)),
                    elements=st.floats(-1e5, 1e5, width=32, allow_subnormal=True)),
       coding=st.sampled_from(["fp32", "fp16", "bf16"]))
def test_hidden_codings_equal_the_dtype_cast(h, coding):
    with np.errstate(over="ignore"):  # beyond float16's range both sides give inf
        assert bits_equal(
            decode_hidden(encode_hidden(h, coding), coding), dtype_cast(h, coding))


def _v2_u8(lp: np.ndarray, tail: np.ndarray) -> dict[str, np.ndarray]:
    """schema_version 2's u8 arrays, from SPEC.md's Versioning section (kd no longer writes them)."""
    ref = np.where(np.isfinite(lp[:, 0]), lp[:, 0], 0.0).astype(np.float32)
    gap = ref[:, None] - lp
    folded = ~(gap < 20.0)
    codes = np.where(folded, U8_PAD, np.round(np.sqrt(np.clip(gap, 0.0, 20.0) / 20.0) * 254)).astype(np.uint8)
    moved = np.where(folded & np.isfinite(lp), lp, -np.inf)
    new_tail = np.logaddexp.reduce(np.concatenate([moved, tail[:, None]], axis=1), axis=1).astype(np.float32)
    delta = codes.copy()
    delta[:, 1:] = codes[:, 1:] - codes[:, :-1]
    return {"logprobs": delta, "logprob_ref": ref, "tail_logmass": new_tail, "folded": folded, "codes": codes}


def test_schema_v2_u8_cache_still_reads(tmp_path):
    """v2 u8 shards store each row's top-1 (``logprob_ref``) and codes on a square-root scale."""
    sig = SignalConfig(top_k=16, value_coding="u8")
    samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([40, 1, 25])]
    path = build_cache(str(tmp_path), samples, sig, shard_size=3).location.path
    lp = np.concatenate([s.logprobs for s in samples])
    v2 = _v2_u8(lp, np.concatenate([s.tail_logmass for s in samples]))
    ids, table = encode_ids(np.where(v2["folded"], -1, np.concatenate([s.ids for s in samples])))
    for name, data in (("logprobs", v2["logprobs"]), ("logprob_ref", v2["logprob_ref"]), ("tail_logmass", v2["tail_logmass"]),
                       ("ids", ids), ("id_table", table)):
        rewrite_shard_array(path, name, data)
    doc = read_manifest(path)
    doc["schema_version"] = 2
    write_manifest(path, doc)
    reader = CacheReader(path)
    expected = v2["logprob_ref"][:, None] - np.square(v2["codes"].astype(np.float32) / 254) * np.float32(20.0)
    expected[v2["folded"]] = -np.inf
    start = 0
    for s in samples:
        got = reader.get(s.sample_id)
        rows = slice(start, start + s.num_tokens)
        assert bits_equal(got.logprobs, expected[rows]) and bits_equal(got.tail_logmass, v2["tail_logmass"][rows])
        assert np.array_equal(got.ids, np.where(v2["folded"][rows], -1, s.ids))
        start += s.num_tokens
    assert verify_cache(path).ok


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), k=st.sampled_from([1, 2, 8, 64]), seed=st.integers(0, 2**16))
def test_u8_on_teacher_like_rows_keeps_kl_tiny(n, k, seed):
    syn = teacher_like_topk(n, k, vocab=512, seed=seed)
    enc = encode_logprobs(syn.logprobs, syn.tail_logmass, "u8")
    kl = kl_topk_buckets(syn.logprobs, syn.tail_logmass, decode_logprobs(enc, "u8"), enc["tail_logmass"])
    assume(np.all(np.isfinite(kl)))
    assert kl.max() <= 2e-3
