"""Frequency-rank id codes (SPEC.md section 5): exact for any int32, in the writer, reader and plain zarr."""

from __future__ import annotations


import numpy as np
import pytest
import zarr
from cache_helpers import (
    build_cache,
    make_signals,
    read_manifest,
    rewrite_shard_array,
    shard_dir,
    write_manifest,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kd.cache_schema import (
    CacheCorruptError,
    CacheReader,
    SignalConfig,
    verify_cache,
)
from kd.cache_schema.id_coding import U16_CODES_MAX, decode_ids, encode_ids, sort_ties, unsort_ties


@settings(max_examples=60, deadline=None)
@given(ids=hnp.arrays(np.int32, st.tuples(st.integers(0, 40), st.integers(0, 9)),
                      elements=st.one_of(st.integers(-1, 20), st.integers(-(2**31), 2**31 - 1))))
def test_codes_round_trip_any_int32(ids):
    codes, table = encode_ids(ids)
    assert codes.shape == ids.shape and table.dtype == np.int32
    assert np.array_equal(decode_ids(codes, table), ids)
    assert len(table) == len(np.unique(ids)) and codes.dtype == np.uint16


def test_table_is_by_descending_count_then_ascending_id():
    ids = np.array([[7, 3, 9], [3, 9, 5], [3, 7, 5]], np.int32)  # 3 x3, then 5/7/9 x2 each
    codes, table = encode_ids(ids)
    assert table.tolist() == [3, 5, 7, 9]
    assert codes.tolist() == [[2, 0, 3], [0, 3, 1], [0, 2, 1]]


def test_tables_over_65536_ids_use_int32_codes_and_both_code_paths_agree():
    rng = np.random.default_rng(0)
    ids = rng.permutation(200_000)[: U16_CODES_MAX + 14].astype(np.int32).reshape(-1, 5)
    codes, table = encode_ids(ids)
    assert codes.dtype == np.int32 and np.array_equal(decode_ids(codes, table), ids)
    wide = ids.copy()
    wide[0, 0] = -(2**31)  # an id range too wide for the bincount path: the sort path must give the same codes
    wide_codes, wide_table = encode_ids(wide)
    assert np.array_equal(decode_ids(wide_codes, wide_table), wide)


def test_code_outside_the_table_is_an_error():
    with pytest.raises(ValueError, match="outside the 2-entry id_table"):
        decode_ids(np.array([[0, 2]], np.uint16), np.array([5, 6], np.int32), "shard/ids")
    with pytest.raises(ValueError, match="outside"):
        decode_ids(np.array([[-1]], np.int32), np.array([5, 6], np.int32))


def test_large_vocab_cache_round_trips_through_kd_and_plain_zarr(tmp_path):
    """> 65536 distinct ids in a shard (a 150k+ vocabulary): int32 codes, read back exactly."""
    sig = SignalConfig(top_k=64, value_coding="bf16")
    samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([900, 700])]
    rng = np.random.default_rng(1)
    for s in samples:  # distinct ids per row spread over a 200k vocabulary, and a -1 entry
        s.ids = ((rng.integers(0, 200_000, (s.num_tokens, 1)) + np.arange(64) * 3119) % 200_000).astype(np.int32)
        s.ids[0, -1] = -1
    path = build_cache(str(tmp_path), samples, sig, shard_size=2).location.path
    group = zarr.open_group(str(shard_dir(path)), mode="r")
    assert group["ids"].dtype == np.int32 and group["id_table"].shape[0] > U16_CODES_MAX
    reader = CacheReader(path)
    start = 0
    for s in samples:
        got = reader.get(s.sample_id)
        assert np.array_equal(got.ids, s.ids) and got.ids.dtype == np.int32
        plain = group["id_table"][...][group["ids"][start : start + s.num_tokens]]  # SPEC.md's decode, no kd
        assert np.array_equal(plain, s.ids)
        start += s.num_tokens
    assert verify_cache(path).ok


@pytest.fixture
def small_cache(tmp_path):
    sig = SignalConfig(top_k=8, value_coding="fp16")
    samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([300, 5])]
    return build_cache(str(tmp_path), samples, sig, shard_size=2).location.path, samples


def test_v1_shard_with_raw_ids_reads_and_a_v2_shard_without_table_is_corrupt(small_cache):
    """schema_version 1 caches hold raw int32 ids and no id_table; in a v2 cache that is corruption."""
    cache, samples = small_cache
    rewrite_shard_array(cache, "ids", np.concatenate([s.ids for s in samples]), drop="id_table")
    with pytest.raises(CacheCorruptError, match="shard has no id_table"):
        CacheReader(cache).get(samples[0].sample_id)
    doc = read_manifest(cache)
    doc["schema_version"] = 1
    write_manifest(cache, doc)
    reader = CacheReader(cache)
    for s in samples:
        assert np.array_equal(reader.get(s.sample_id).ids, s.ids)


def test_code_outside_the_id_table_is_a_corrupt_cache(small_cache):
    cache, _ = small_cache
    table = zarr.open_group(str(shard_dir(cache)), mode="r")["id_table"][...]
    rewrite_shard_array(cache, "id_table", table[:1])  # every code >= 1 now points past the table
    with pytest.raises(CacheCorruptError, match="ids chunk 0.*outside the 1-entry id_table"):
        CacheReader(cache).get("s-0")


def test_single_distinct_id_whose_chunks_zarr_leaves_unwritten(tmp_path):
    """Codes all 0 and table [0]: zarr writes no chunk for either (all fill value); reads are still exact."""
    sig = SignalConfig(top_k=1, value_coding="fp32")
    samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([3, 4])]
    for s in samples:
        s.ids = np.zeros_like(s.ids)
    path = build_cache(str(tmp_path), samples, sig, shard_size=2).location.path
    assert not (shard_dir(path) / "id_table" / "c").exists()
    reader = CacheReader(path)
    for s in samples:
        assert np.array_equal(reader.get(s.sample_id).ids, s.ids)
    assert verify_cache(path).ok


@settings(max_examples=150, deadline=None)
@given(shape=st.tuples(st.integers(0, 6), st.integers(1, 12)), seed=st.integers(0, 2**16), wide=st.booleans())
def test_tie_sorting_round_trips_and_moves_entries_only_within_runs(shape, seed, wide):
    """Runs of equal group values (any order, not only sorted rows) keep their places; codes return."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 3, shape).astype(np.uint8)
    dtype = np.int32 if wide else np.uint16
    codes = rng.integers(0, 70000 if wide else 65536, shape).astype(dtype)
    stored, order = sort_ties(codes, groups)
    assert stored.dtype == codes.dtype and stored.shape == codes.shape
    sorted_codes = np.take_along_axis(codes, order, axis=1)
    assert np.array_equal(np.take_along_axis(groups, order, axis=1), groups)  # never across runs
    assert np.array_equal(unsort_ties(stored, groups), sorted_codes)
    for r in range(shape[0]):  # ascending within each run, the run's first code stored as is
        for j in range(1, shape[1]):
            if groups[r, j] == groups[r, j - 1]:
                assert sorted_codes[r, j] >= sorted_codes[r, j - 1]
                assert stored[r, j] == sorted_codes[r, j] - sorted_codes[r, j - 1]
            else:
                assert stored[r, j] == sorted_codes[r, j]
