"""Frequency-rank id codes (SPEC.md section 5): exact for any int32, in the writer, reader and plain zarr.

schema_version 5: uint16 low code bits + ``ids_hi`` planes, targets as codes into the same table,
the table stored as differences; schema_version 2-4 shards (``encode_ids``) still read.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr
from cache_helpers import (
    build_cache,
    make_signals,
    read_manifest,
    rewrite_shard_array,
    same_entries_per_row,
    shard_dir,
    write_manifest,
)
from hypothesis import given, settings
from large_vocab import large_vocab_samples
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kd.cache_schema import (
    CacheCorruptError,
    SCHEMA_VERSION,
    CacheReader,
    SignalConfig,
    verify_cache,
)
from kd.cache_schema.codecs import undelta_logprobs
from kd.cache_schema.id_coding import (
    IDS_HI,
    U16_CODES_MAX,
    IdRanks,
    decode_ids,
    encode_ids,
    hi_planes,
    join_codes,
    load_table,
    sort_ties,
    split_codes,
    store_table,
    unsort_ties,
)
from kd.cache_schema.synthetic import teacher_like_topk
from kd.cache_schema.topk_coding import encode_topk, resolve_targets, ties_sorted

SPEC = __import__("pathlib").Path(__file__).resolve().parents[1] / "kd" / "cache_schema" / "SPEC.md"
any_int32 = st.one_of(st.integers(-1, 20), st.integers(-(2**31), 2**31 - 1))


# ------------------------------------------------------------------ schema_version 2-4 (encode_ids)


@settings(max_examples=60, deadline=None)
@given(ids=hnp.arrays(np.int32, st.tuples(st.integers(0, 40), st.integers(0, 9)), elements=any_int32))
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


# ------------------------------------------------------------------ schema_version 5 pieces


@settings(max_examples=80, deadline=None)
@given(ids=hnp.arrays(np.int32, st.tuples(st.integers(0, 40), st.integers(0, 9)), elements=any_int32),
       targets=st.data())
def test_v5_ranks_round_trip_any_int32_ids_and_targets(ids, targets):
    """Every id and target gets a code and the table holds each distinct value once, over the
    direct, the offset and the sort lookups alike."""
    tgt = targets.draw(hnp.arrays(np.int32, ids.shape[0], elements=any_int32))
    ranks = IdRanks(ids, tgt)
    codes, target_codes, table = ranks.codes(ids), ranks.codes(tgt), ranks.table
    assert codes.dtype == np.uint32 and codes.shape == ids.shape and table.dtype == np.int32
    assert np.array_equal(table[codes], ids) and np.array_equal(table[target_codes], tgt)
    assert len(table) == len(np.unique(np.concatenate([ids.ravel(), tgt])))


@pytest.mark.parametrize("offset", [0, -(2**20), 2**30])  # direct lookup, negative ids from its end, by offset
def test_v5_table_order_by_count_class_then_id(offset):
    ids = np.array([[5, 3], [9, 3], [8, 3], [3, 5], [3, 7]], np.int32) + np.int32(offset)
    targets = np.array([7, 7, 7, 7, 7], np.int32) + np.int32(offset)
    ranks = IdRanks(ids, targets)
    # counts: 7 x6 (class 6), 3 x5 (class 5), 5 x2, then 8 and 9 x1, ascending
    assert (ranks.table - np.int32(offset)).tolist() == [7, 3, 5, 8, 9]
    assert np.array_equal(ranks.table[ranks.codes(ids)], ids)


def test_v5_count_classes_make_ascending_runs():
    counts = {17: 9, 2: 8, 40: 12, 31: 15}  # 8 and 9 share class 8 (3 leading bits); 12 and 15 (class 14) do not
    targets = np.repeat(np.array(list(counts), np.int32), list(counts.values()))  # every target is counted
    assert IdRanks(np.zeros((0, 3), np.int32), targets).table.tolist() == [31, 40, 2, 17]
    assert IdRanks(np.zeros((0, 3), np.int32), np.zeros(0, np.int32)).table.tolist() == []


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 6), k=st.integers(1, 70), table_len=st.sampled_from([1, 65536, 65537, 151936, 262144, 262145,
       2**20 + 1, 2**24 + 5, 2**31 - 1]), seed=st.integers(0, 2**16))
def test_split_codes_round_trip_across_plane_counts(n, k, table_len, seed):
    codes = np.random.default_rng(seed).integers(0, table_len, (n, k)).astype(np.uint32)
    if n:
        codes[0, 0] = table_len - 1  # the largest code the table allows
    low, high = split_codes(codes, table_len)
    assert low.dtype == np.uint16 and low.shape == (n, k)
    planes = hi_planes(table_len)
    assert (high is None) == (planes == 0)
    if high is not None:
        assert high.dtype == np.uint8 and high.shape == (n, planes, -(-k // 4))
    assert np.array_equal(join_codes(low, high), codes)


def test_hi_planes_by_table_size():
    assert [hi_planes(v) for v in (0, 1, 65536, 65537, 151936, 262144, 262145, 2**24, 2**24 + 1)] == [0, 0, 0, 1, 1, 1, 2, 4, 5]


def test_ids_hi_bit_layout_is_the_documented_one():
    codes = np.array([[0x10000 * 1, 0x10000 * 2, 0x10000 * 3, 0, 0x10000 * 2 + 7]], np.uint32)
    low, high = split_codes(codes, 4 * 65536)
    assert low.tolist() == [[0, 0, 0, 0, 7]]
    assert high.tolist() == [[[1 | 2 << 2 | 3 << 4, 2]]]  # entry j: byte j // 4, bits 2 * (j % 4)


@settings(max_examples=60, deadline=None)
@given(table=hnp.arrays(np.int32, st.integers(0, 30), elements=any_int32))
def test_stored_table_round_trips_through_int32_wraparound(table):
    stored = store_table(table)
    assert stored.dtype == np.int32 and np.array_equal(load_table(stored), table)


@settings(max_examples=150, deadline=None)
@given(shape=st.tuples(st.integers(0, 6), st.integers(1, 12)), seed=st.integers(0, 2**16), wide=st.booleans(),
       rising=st.booleans())
def test_tie_sorting_round_trips_and_moves_entries_only_within_runs(shape, seed, wide, rising):
    """Runs of equal group values (rising along rows, as u8 codes are, or in any order) keep their
    places; codes come back sorted within each run."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 3, shape).astype(np.uint8)
    if rising:
        groups = np.sort(groups, axis=1)
    dtype = np.uint32 if wide else np.uint16
    codes = rng.integers(0, 2**31 - 1 if wide else 65536, shape).astype(dtype)
    stored, sorted_codes = sort_ties(codes, groups)
    assert stored.dtype == sorted_codes.dtype == codes.dtype and stored.shape == codes.shape
    ordered = unsort_ties(stored, groups)
    assert np.array_equal(ordered, sorted_codes)
    for r in range(shape[0]):
        run = np.concatenate([[0], np.cumsum(groups[r, 1:] != groups[r, :-1])])
        for g in np.unique(run):
            at = run == g
            assert sorted(codes[r, at].tolist()) == ordered[r, at].tolist()  # a permutation within the run
            assert stored[r, at][0] == ordered[r, at][0] and np.array_equal(stored[r, at][1:], np.diff(ordered[r, at]))


def _decode_in_memory(arrays: dict, coding: str) -> tuple[np.ndarray, np.ndarray]:
    """A v6 shard's ids and targets from ``encode_topk``'s arrays, as the reader decodes them."""
    table = load_table(arrays["id_table"])
    codes = join_codes(arrays["ids"], arrays.get(IDS_HI))
    if ties_sorted(coding, "topk", SCHEMA_VERSION):
        codes = unsort_ties(codes, undelta_logprobs(arrays["logprobs"], coding))
    ids = decode_ids(codes, table)
    return ids, resolve_targets(arrays["target_ids"], ids, table, "targets")


@pytest.mark.parametrize("coding", ["fp32", "fp16", "bf16", "u8"])
@pytest.mark.parametrize("vocab, n, spread", [(151_936, 6000, False), (151_936, 3000, True), (50, 300, False)])
def test_topk_arrays_round_trip_exactly(coding, vocab, n, spread):
    """A real vocabulary (151936: > 65536 distinct ids in the shard), its ids spread over all of int32
    (the sort path) and a small one, every coding: ids (u8: folded -1; ties of every 16-bit coding in
    canonical order), targets (in their rows: stored as columns; not in them: as codes)."""
    syn = teacher_like_topk(n, 64 if vocab > 50 else 40, vocab=vocab, seed=3)
    ids, targets = syn.ids, syn.target_ids.copy()
    targets[::7] = (targets[::7] + 12345) % vocab  # targets not in their rows too
    if spread:  # an injective map onto [-2^30, 2^30]: an id range over 2^24
        ids, targets = ((a.astype(np.int64) * 14133 - 2**30).astype(np.int32) for a in (ids, targets))
        ids[0, 0], targets[1] = 2**31 - 1, -(2**31)
    arrays = encode_topk(ids, syn.logprobs, syn.tail_logmass, targets, coding)
    if vocab == 151_936 and not spread:
        assert len(arrays["id_table"]) > U16_CODES_MAX and arrays[IDS_HI].shape[1] == 1
    expected = ids
    if coding == "u8":
        expected = np.where(np.cumsum(arrays["logprobs"], axis=1, dtype=np.uint32).astype(np.uint8) >= 160, -1, ids)
    in_row = (expected == targets[:, None]).any(axis=1)  # u8: a folded target has no id in its row
    assert in_row.mean() > 0.5 and np.array_equal(arrays["target_ids"] < 0, in_row)
    got_ids, got_targets = _decode_in_memory(arrays, coding)
    assert np.array_equal(got_targets, targets)
    if coding == "fp32":
        assert np.array_equal(got_ids, expected)
    else:  # ties come back in canonical order: the same entries per row, and the same id at each value
        assert all(sorted(a) == sorted(b) for a, b in zip(got_ids.tolist(), expected.tolist()))
        values = undelta_logprobs(arrays["logprobs"], coding)
        assert np.array_equal(same_value_sets(got_ids, values), same_value_sets(expected, values))
        assert not np.array_equal(got_ids, expected)  # ties were reordered: the check above can fail


def same_value_sets(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each row's ids sorted within runs of equal values (what tie order may change)."""
    key = values.astype(np.int64) << 32 | (ids.astype(np.int64) & 0xFFFFFFFF)
    return np.sort(key, axis=1)


def test_v5_topk_of_no_rows():
    arrays = encode_topk(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                         np.zeros(0, np.int32), "u8")
    assert {name: a.shape for name, a in arrays.items()} == {"target_ids": (0,), "ids": (0, 4), "id_table": (0,),
                                                             "logprobs": (0, 4), "tail_logmass": (0,)}


# ------------------------------------------------------------------ through real caches


def spec_example():
    code = re.search(r"```python\n(.*?)```", SPEC.read_text()[SPEC.read_text().index("## Reading without kd"):], re.S).group(1)
    namespace: dict = {"__name__": "spec_example"}
    exec(compile(code, str(SPEC), "exec"), namespace)
    return namespace["read_topk"]


@pytest.mark.parametrize("coding", ["bf16", "u8", "fp32"])
def test_large_vocab_cache_round_trips_through_kd_spec_example_and_plain_zarr(tmp_path, coding):
    """> 65536 distinct ids in a shard (a 151936 vocabulary): ``ids_hi``, read back exactly by kd, by
    SPEC.md's plain-zarr example and by zarr itself."""
    sig = SignalConfig(top_k=64, value_coding=coding)
    samples = large_vocab_samples(sig)
    path = build_cache(str(tmp_path), samples, sig, shard_size=2).location.path
    group = zarr.open_group(str(shard_dir(path)), mode="r")
    assert group["ids"].dtype == np.uint16 and group[IDS_HI].shape == (6000, 1, 16)
    table = load_table(group["id_table"][...])
    assert len(table) > U16_CODES_MAX
    reader, read_topk = CacheReader(path), spec_example()
    for s in samples:
        got = reader.get(s.sample_id)
        assert got.ids.dtype == np.int32 and np.array_equal(got.target_ids, s.target_ids)
        plain_ids, plain_lp, plain_tail = read_topk(path, s.sample_id)
        assert np.array_equal(plain_ids, got.ids) and np.array_equal(plain_lp.view(np.int32), got.logprobs.view(np.int32))
        if coding != "fp32":  # ties come back in canonical order, u8's folded entries as -1
            assert same_entries_per_row(got.ids, got.logprobs, np.where(np.isneginf(got.logprobs), -1, s.ids))
        else:
            assert np.array_equal(got.ids, s.ids)
    assert verify_cache(path).ok


def _rewrite_as(path: str, samples, sig: SignalConfig, version: int) -> None:
    """Shard 0 rewritten with an older schema_version's arrays and the manifest saying it. v4: int32
    codes for big tables, raw targets, a plain table, u8 folded code 255; v5: targets as codes, float32
    tails, no tie order for fp16 / bf16."""
    cat = {name: np.concatenate([getattr(s, name) for s in samples]) for name in ("ids", "logprobs", "tail_logmass", "target_ids")}
    old = encode_topk(cat["ids"], cat["logprobs"], cat["tail_logmass"], cat["target_ids"], sig.value_coding,
                      schema_version=version)
    group = zarr.open_group(str(shard_dir(path)), mode="r")
    if IDS_HI in group and IDS_HI not in old:
        rewrite_shard_array(path, IDS_HI, None, drop=IDS_HI)
    for name, data in old.items():
        rewrite_shard_array(path, name, data)
    doc = read_manifest(path)
    doc["schema_version"] = version
    write_manifest(path, doc)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("coding, vocab", [("bf16", 151_936), ("u8", 151_936), ("fp16", 4096), ("u8", 4096)])
def test_older_schema_shards_still_read(tmp_path, coding, vocab, version):
    """A shard as kd wrote it before (v4: int32 codes over 65536 ids, targets as ids, the table as
    values; v5: float32 tails, targets as codes, fp16 / bf16 ties in the teacher's order) reads the
    same ids, targets and log-probs as the current shard of the same samples, and fp32 tails."""
    sig = SignalConfig(top_k=64, value_coding=coding)
    samples = large_vocab_samples(sig, (2500, 1500), vocab)
    path = build_cache(str(tmp_path), samples, sig, shard_size=2).location.path
    current = [CacheReader(path).get(s.sample_id) for s in samples]
    _rewrite_as(path, samples, sig, version)
    group = zarr.open_group(str(shard_dir(path)), mode="r")
    wide = vocab > 65536 and version == 4
    assert (IDS_HI in group) == (vocab > 65536 and version == 5) and group["ids"].dtype == (np.int32 if wide else np.uint16)
    assert group["tail_logmass"].dtype == np.float32 and (group["target_ids"][...] >= 0).all()
    reader, read_topk = CacheReader(path), spec_example()
    for s, want in zip(samples, current):
        got = reader.get(s.sample_id)
        assert np.array_equal(got.target_ids, s.target_ids)
        assert np.array_equal(got.logprobs.view(np.int32), want.logprobs.view(np.int32))
        if coding == "u8":  # a tie group's canonical order is by code, and v4's table orders ids otherwise
            assert same_entries_per_row(got.ids, got.logprobs, want.ids)
        else:  # fp16 / bf16: the teacher's order in v4 / v5, tie groups sorted since v6
            assert np.array_equal(got.ids, s.ids) and same_entries_per_row(got.ids, got.logprobs, want.ids)
            assert np.array_equal(got.tail_logmass, s.tail_logmass)
        plain_ids, _, plain_tail = read_topk(path, s.sample_id)
        assert np.array_equal(plain_ids, got.ids) and np.array_equal(plain_tail, got.tail_logmass)
    assert verify_cache(path).ok


def test_v5_shard_without_its_ids_hi_is_corrupt(tmp_path):
    sig = SignalConfig(top_k=64, value_coding="bf16")
    samples = large_vocab_samples(sig, (2000, 1500))
    path = build_cache(str(tmp_path), samples, sig, shard_size=2).location.path
    rewrite_shard_array(path, IDS_HI, None, drop=IDS_HI)
    with pytest.raises(CacheCorruptError, match=r"id_table needs 1 ids_hi planes, the shard has 0"):
        CacheReader(path).get("s-0")


@pytest.fixture
def small_cache(tmp_path):
    sig = SignalConfig(top_k=8, value_coding="fp16")
    samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([300, 5])]
    return build_cache(str(tmp_path), samples, sig, shard_size=2).location.path, samples


def test_v1_shard_with_raw_ids_reads_and_a_v2_shard_without_table_is_corrupt(small_cache):
    """schema_version 1 caches hold raw int32 ids and no id_table; in a v2 cache that is corruption."""
    cache, samples = small_cache
    rewrite_shard_array(cache, "ids", np.concatenate([s.ids for s in samples]), drop="id_table")
    rewrite_shard_array(cache, "target_ids", np.concatenate([s.target_ids for s in samples]))
    doc = read_manifest(cache)
    doc["schema_version"] = 2
    write_manifest(cache, doc)
    with pytest.raises(CacheCorruptError, match="shard has no id_table"):
        CacheReader(cache).get(samples[0].sample_id)
    doc["schema_version"] = 1
    write_manifest(cache, doc)
    reader = CacheReader(cache)
    for s in samples:
        got = reader.get(s.sample_id)
        assert np.array_equal(got.ids, s.ids) and np.array_equal(got.target_ids, s.target_ids)


def test_code_outside_the_id_table_is_a_corrupt_cache(small_cache):
    cache, _ = small_cache
    stored = zarr.open_group(str(shard_dir(cache)), mode="r")["id_table"][...]
    rewrite_shard_array(cache, "id_table", stored[:1])  # every code >= 1 now points past the table
    with pytest.raises(CacheCorruptError, match="ids chunk 0.*outside the 1-entry id_table"):
        CacheReader(cache).get("s-0")


@pytest.mark.parametrize("bad, match", [
    (lambda group: group["id_table"].shape[0], "target_ids: id code outside"),  # a code one past the table
    (lambda group: -(group["ids"].shape[1] + 1), "target_ids: a target names column 8 of a 8-entry row"),  # column k
], ids=["code", "column"])
def test_target_outside_its_table_or_row_is_a_corrupt_cache(small_cache, bad, match):
    cache, _ = small_cache
    group = zarr.open_group(str(shard_dir(cache)), mode="r")
    stored = group["target_ids"][...]
    assert (stored < 0).any()  # targets the rows hold are stored as columns
    stored[0] = bad(group)
    rewrite_shard_array(cache, "target_ids", stored)
    with pytest.raises(CacheCorruptError, match=match):
        CacheReader(cache).get("s-0")


def test_single_distinct_id_whose_chunks_zarr_leaves_unwritten(tmp_path):
    """Codes all 0 and table [0]: zarr writes no chunk of ids or the table (all fill value; the
    targets are column 0 of their rows, -1); reads are still exact."""
    sig = SignalConfig(top_k=1, value_coding="fp32")
    samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([3, 4])]
    for s in samples:
        s.ids = np.zeros_like(s.ids)
        s.target_ids = np.zeros_like(s.target_ids)
        s.input_ids[s.answer_start:] = 0
    path = build_cache(str(tmp_path), samples, sig, shard_size=2).location.path
    assert not any((shard_dir(path) / name / "c").exists() for name in ("id_table", "ids"))
    assert (zarr.open_group(str(shard_dir(path)), mode="r")["target_ids"][...] == -1).all()  # column 0 of its row
    reader = CacheReader(path)
    for s in samples:
        got = reader.get(s.sample_id)
        assert np.array_equal(got.ids, s.ids) and np.array_equal(got.target_ids, s.target_ids)
    assert verify_cache(path).ok
