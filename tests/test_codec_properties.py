"""Property tests of the cache codecs on arbitrary shapes and values (hypothesis).

Log-prob rows: N in 0..50 rows, k in 1..70 columns, sorted descending, with -inf entries and
-inf tails, very negative values and exact zeros. Exact codings must round-trip bit for bit to
their dtype; ``u8`` must fold exactly the entries 17 nats or more below the top-1, keep each
kept entry's gap to the top-1 inside the bound of its power-law quantiser, decode rows whose
entries and tail sum to one, and keep the KL over the k + 1 buckets under the bound those
per-entry errors imply. Ids (any int32 in a vocabulary, -1
for folded / padding) must come back unchanged through a real shard writer and reader.
"""

from __future__ import annotations

import uuid

import numpy as np
import torch
from cache_helpers import same_entries_per_row
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kd.cache_schema import BuildPlan, CacheBuild, CacheReader, Location, SignalConfig, key_inputs
from kd.cache_schema.codecs import (
    U8_BETA,
    U8_FOLD_NATS,
    U8_LEVELS,
    U8_PAD,
    _encode_u8,
    decode_logprobs,
    decode_tail,
    encode_logprobs,
    encode_logprobs_codes,
    kl_topk_buckets,
)
from kd.pipeline.build.signals import TeacherSignals

_H = 0.5 / U8_LEVELS  # half a u8 code step on the (p / p_top1)^(1/3) scale

# Log-prob values: -inf, very negative, ordinary, tiny and exactly 0 (floats as float32 can hold them).
logprob_values = st.one_of(
    st.just(-np.inf),
    st.floats(-(2.0**127), -1024.0, width=32),
    st.floats(-60.0, 0.0, width=32),
    st.floats(-(2.0**-20), 0.0, width=32, allow_subnormal=True),
    st.just(0.0),
)


@st.composite
def logprob_rows(draw, max_n: int = 50, max_k: int = 70) -> np.ndarray:
    """``[N, k]`` float32 rows sorted descending; some rows get a -inf tail or are all -inf."""
    n = draw(st.integers(0, max_n))
    k = draw(st.integers(1, max_k))
    x = draw(hnp.arrays(np.float32, (n, k), elements=logprob_values))
    x = -np.sort(-x, axis=1)  # descending; -inf sorts last
    if n and k > 1:
        cut = draw(st.integers(1, k))  # a -inf tail from column `cut` on, in some rows
        rows = draw(hnp.arrays(np.bool_, n))
        x[rows, cut:] = -np.inf
    return x


tails = st.one_of(st.just(-np.inf), st.floats(-80.0, -(2.0**-10), width=32))


def dtype_cast(x: np.ndarray, coding: str) -> np.ndarray:
    """The value a lossless coding must return: the float32 input cast to its dtype (torch as reference)."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[coding]
    return t.to(dtype).to(torch.float32).numpy()


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@settings(max_examples=120, deadline=None)
@given(lp=logprob_rows(), tail=tails, coding=st.sampled_from(["fp32", "fp16", "bf16"]))
def test_lossless_codings_round_trip_exactly_to_their_dtype(lp, tail, coding):
    tail_logmass = np.full(lp.shape[0], tail, np.float32)
    with np.errstate(over="ignore"):  # very negative values become -inf in fp16, on both sides
        enc = encode_logprobs(lp, tail_logmass, coding)
        expected = dtype_cast(lp, coding)
    dec = decode_logprobs(enc, coding)
    assert dec.dtype == np.float32 and bits_equal(dec, expected)
    with np.errstate(over="ignore"):  # fp16 / bf16: the tail in the coding's dtype, other codings as is
        assert bits_equal(decode_tail(enc["tail_logmass"], coding), dtype_cast(tail_logmass, coding))
    assert (enc["tail_logmass"].dtype == np.float32) == (coding == "fp32")


def _row_top1(lp: np.ndarray) -> np.ndarray:
    top = lp.max(axis=1) if lp.shape[0] else np.zeros(0, np.float32)
    return np.where(np.isfinite(top), top, 0.0).astype(np.float64)


def _u8_gap_bound(gap: np.ndarray) -> np.ndarray:
    """SPEC.md section 6: a kept entry's gap g decodes within beta * ln(q / (q - h)), q = exp(-g / beta)."""
    q = np.exp(-np.clip(gap, 0.0, U8_FOLD_NATS) / U8_BETA)
    return U8_BETA * np.log(q / (q - _H))


def _normalised(lp: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows shifted so entries and tail sum to one, as a teacher's are (rows with no mass kept as is)."""
    z = np.logaddexp.reduce(np.concatenate([lp, tail[:, None]], axis=1).astype(np.float64), axis=1)
    z = np.where(np.isfinite(z), z, 0.0)
    return (lp - z[:, None]).astype(np.float32), (tail - z).astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(lp=logprob_rows(), tail=tails)
def test_u8_folding_gap_error_bound_and_normalised_rows(lp, tail):
    n = lp.shape[0]
    tail_logmass = np.full(n, tail, np.float32)
    enc = encode_logprobs(lp, tail_logmass, "u8")
    dec = decode_logprobs(enc, "u8")
    assert dec.shape == lp.shape and dec.dtype == np.float32 and set(enc) == {"logprobs", "tail_logmass"}
    gap = _row_top1(lp)[:, None] - lp
    folded = ~(gap < U8_FOLD_NATS)  # -inf entries and entries 17+ nats below the top-1
    assert np.array_equal(np.isneginf(dec), folded) and not np.isnan(dec).any()
    kept = ~folded
    # Gaps to the top-1 (whose code is 0, decoded exactly) stay inside the quantiser's cell.
    with np.errstate(invalid="ignore"):  # -inf - -inf in rows that are all folded
        err = np.abs(dec[:, :1].astype(np.float64) - dec - gap)
    rounding = 4 * np.spacing(np.abs(dec).astype(np.float32)).astype(np.float64) + 4 * np.spacing(np.abs(lp)).astype(np.float64)
    assert np.all(err[kept] <= (_u8_gap_bound(gap) + rounding + 1e-5)[kept])
    # The folded entries' mass is added to the tail, in float32.
    moved = np.where(folded & np.isfinite(lp), lp, -np.inf).astype(np.float64)
    expect = np.logaddexp.reduce(np.concatenate([moved, tail_logmass[:, None].astype(np.float64)], 1), axis=1)
    finite = np.isfinite(expect)
    assert np.array_equal(np.isfinite(enc["tail_logmass"]), finite)
    assert np.allclose(enc["tail_logmass"][finite], expect[finite], rtol=1e-6, atol=1e-5)
    # Decoded entries and the stored tail sum to one (the row's level is derived from the tail).
    rows = kept.any(axis=1) & (enc["tail_logmass"] < -1e-4)
    total = np.logaddexp.reduce(np.concatenate([dec, enc["tail_logmass"][:, None]], 1).astype(np.float64), axis=1)
    assert np.allclose(total[rows], 0.0, atol=1e-4)


@settings(max_examples=120, deadline=None)
@given(lp=logprob_rows(), tail=tails)
def test_u8_kl_over_k_plus_one_buckets_is_bounded(lp, tail):
    # Teacher rows sum to one; keep rows that hold some probability mass.
    lp, tail_logmass = _normalised(lp, np.full(lp.shape[0], tail, np.float32))
    live = np.isfinite(lp).any(axis=1) | np.isfinite(tail_logmass)
    lp, tail_logmass = lp[live], tail_logmass[live]
    enc = encode_logprobs(lp, tail_logmass, "u8")
    dec = decode_logprobs(enc, "u8")
    kl = kl_topk_buckets(lp, tail_logmass, dec, enc["tail_logmass"])
    assert kl.shape == (lp.shape[0],) and np.all(np.isfinite(kl))
    # The top-k's mass is exact (it is 1 - tail); within it each kept entry's log-weight moves by
    # at most its gap bound e_j and the normaliser by at most log(sum_j pi_j exp(e_j)), so
    # KL <= sum_j p_j (e_j + e_norm) over the kept entries (plus float32 rounding).
    gap = _row_top1(lp)[:, None] - lp
    kept = np.isfinite(dec)
    e = np.where(kept, _u8_gap_bound(gap), 0.0)
    p = np.where(kept, np.exp(lp.astype(np.float64)), 0.0)
    pi = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    e_norm = np.log(np.maximum((pi * np.exp(e)).sum(axis=1), 1.0))
    bound = (p * (e + e_norm[:, None])).sum(axis=1) + 1e-5
    assert np.all(kl >= -1e-9) and np.all(kl <= bound)


def _u8_reference(lp: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md section 6's u8 encoder, literally, in float64 (the writer evaluates it in float32 and
    redoes the entries near a rounding boundary): codes (folded = 255) and the new tail."""
    top1 = _row_top1(lp)
    gap = top1[:, None] - lp.astype(np.float64)
    folded = ~(gap < U8_FOLD_NATS)
    codes = np.minimum(np.round(U8_LEVELS * -np.expm1(-np.clip(gap, 0.0, U8_FOLD_NATS) / U8_BETA)), U8_LEVELS - 1)
    moved = np.where(folded & np.isfinite(lp), lp, -np.inf).astype(np.float64)
    new_tail = np.logaddexp.reduce(np.concatenate([moved, tail[:, None].astype(np.float64)], 1), axis=1)
    return np.where(folded, 255, codes).astype(np.uint8), new_tail.astype(np.float32)


@st.composite
def near_boundary_rows(draw) -> np.ndarray:
    """Rows whose gaps to the top-1 sit on (within float32 rounding of) u8 rounding boundaries and the fold."""
    n, k = draw(st.integers(1, 20)), draw(st.integers(1, 40))
    top = draw(hnp.arrays(np.float32, (n, 1), elements=st.floats(-30.0, 0.0, width=32)))
    half = draw(hnp.arrays(np.float64, (n, k), elements=st.integers(0, 2 * U8_LEVELS).map(lambda c: c / 2)))
    gap = -U8_BETA * np.log1p(-np.minimum(half, U8_LEVELS - 0.5) / U8_LEVELS)  # code c + 1/2 (and c)
    gap = np.where(half > U8_LEVELS, U8_FOLD_NATS, gap)
    nudge = draw(hnp.arrays(np.int8, (n, k), elements=st.integers(-2, 2)))
    x = (top - gap).astype(np.float32)
    towards = np.where(nudge > 0, np.float32(np.inf), np.where(nudge < 0, np.float32(-np.inf), x))
    x = np.nextafter(x, towards).astype(np.float32)  # one float32 step either way, or none
    x[:, :1] = top
    return -np.sort(-x, axis=1)


@settings(max_examples=200, deadline=None)
@given(lp=st.one_of(logprob_rows(), near_boundary_rows()), tail=tails)
def test_u8_fast_encoder_equals_the_float64_formula(lp, tail):
    """Same codes as SPEC.md's float64 formula everywhere (ties to even, the fold at exactly 17 nats),
    and the folded mass in the tail within float64 rounding of log-add-exp."""
    tail_logmass = np.full(lp.shape[0], tail, np.float32)
    want_codes, want_tail = _u8_reference(lp, tail_logmass)
    codes, new_tail = _encode_u8(lp, tail_logmass, U8_PAD)
    assert np.array_equal(codes, want_codes)
    assert np.array_equal(np.isfinite(new_tail), np.isfinite(want_tail))
    finite = np.isfinite(want_tail)
    assert np.all(np.abs(new_tail[finite] - want_tail[finite]) <= 2 * np.spacing(np.abs(want_tail[finite])))


@settings(max_examples=60, deadline=None)
@given(lp=logprob_rows(), tail=tails)
def test_u8_fold_code_160_decodes_as_255_does(lp, tail):
    """schema_version 5 folds to code 160 (the row's last delta stays small), 1-4 to 255: any code
    >= 160 decodes to -inf, so both give the same log-probs."""
    tail_logmass = np.full(lp.shape[0], tail, np.float32)
    v5, codes = encode_logprobs_codes(lp, tail_logmass, "u8")
    v4, old_codes = encode_logprobs_codes(lp, tail_logmass, "u8", U8_PAD)
    assert np.array_equal(codes == U8_LEVELS, old_codes == U8_PAD) and not ((codes > U8_LEVELS) & (codes != U8_PAD)).any()
    assert bits_equal(decode_logprobs(v5, "u8"), decode_logprobs(v4, "u8"))


# ------------------------------------------------------------------------- ids through a real cache


@st.composite
def id_samples(draw):
    """A few samples of ``[T, k]`` int32 ids drawn from a vocabulary, -1 entries, and a value coding."""
    k = draw(st.integers(1, 9))
    vocab = draw(st.sampled_from([2, 1000, 70_000, 151_936, 2**31 - 1]))
    coding = draw(st.sampled_from(["fp32", "fp16", "bf16", "u8"]))
    samples = []
    for i in range(draw(st.integers(1, 4))):
        t = draw(st.integers(1, 6))
        rows = []
        for _ in range(t):  # a row's ids are distinct (writers refuse repeats); -1 pads anywhere
            n_real = draw(st.integers(0, min(k, vocab)))
            real = draw(st.lists(st.integers(0, vocab - 1), min_size=n_real, max_size=n_real, unique=True))
            rows.append(draw(st.permutations(real + [-1] * (k - n_real))))
        ids = np.array(rows, np.int32)
        lp = draw(hnp.arrays(np.float32, (t, k), elements=st.one_of(st.just(-np.inf), st.floats(-40.0, 0.0, width=32))))
        lp = -np.sort(-lp, axis=1)
        target = draw(hnp.arrays(np.int32, t, elements=st.integers(0, vocab - 1)))
        samples.append(TeacherSignals(sample_id=f"s-{i}", target_ids=target, ids=ids, logprobs=lp,
                                      tail_logmass=np.full(t, -5.0, np.float32),
                                      input_ids=np.concatenate([np.zeros(2, np.int32), target]), answer_start=2))
    return k, coding, samples


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=id_samples())
def test_ids_round_trip_through_shard_writer_and_reader(case):
    k, coding, samples = case
    sig = SignalConfig(top_k=k, value_coding=coding)
    inputs = key_inputs(teacher={"name": "prop", "revision": "r"}, tokenizer_hash="t", template_hash="c",
                        dataset_fingerprint=uuid.uuid4().hex, signals=sig, engine={})
    root = Location.from_url(f"memory://kd-codec-props-{uuid.uuid4().hex[:12]}")
    build = CacheBuild(root, inputs, {"name": "prop"}, sig)
    try:
        plan = BuildPlan.from_ids([s.sample_id for s in samples], 3)
        build.start(plan)
        by_id = {s.sample_id: s for s in samples}
        for shard, ids in enumerate(plan.shards):
            writer = build.shard_writer(shard)
            for sid in ids:
                writer.add(by_id[sid], "cap")
            writer.commit()
        build.seal("test")
        reader = CacheReader(build.location.url)
        for s in samples:
            got = reader.get(s.sample_id)
            expected = s.ids
            if coding == "u8":  # entries folded into the tail are stored as id -1
                gap = np.where(np.isfinite(s.logprobs[:, :1]), s.logprobs[:, :1], 0.0) - s.logprobs
                expected = np.where(~(gap < U8_FOLD_NATS), -1, s.ids)
            assert got.ids.dtype == np.int32, s.sample_id
            if coding != "fp32":  # ties (equal decoded log-probs) come back in a canonical order
                assert same_entries_per_row(got.ids, got.logprobs, expected), s.sample_id
            else:
                assert np.array_equal(got.ids, expected), s.sample_id
            assert np.array_equal(got.target_ids, s.target_ids)
    finally:
        root.fs.rm(root.path, recursive=True)
