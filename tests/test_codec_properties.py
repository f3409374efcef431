"""Property tests of the cache codecs on arbitrary shapes and values (hypothesis).

Log-prob rows: N in 0..50 rows, k in 1..70 columns, sorted descending, with -inf entries and
-inf tails, very negative values and exact zeros. Exact codings must round-trip bit for bit to
their dtype; ``u8`` must keep the top-1 exact, fold exactly the entries 20 nats or more below
it, stay inside the per-entry error bound of its square-root quantiser, and keep the KL over the
k + 1 buckets under the bound that per-entry error implies. Ids (any int32 in a vocabulary, -1
for folded / padding) must come back unchanged through a real shard writer and reader.
"""

from __future__ import annotations

import uuid

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kd.cache_schema import BuildPlan, CacheBuild, CacheReader, Location, SignalConfig, key_inputs
from kd.cache_schema.codecs import U8_GAP_NATS, decode_logprobs, encode_logprobs, kl_topk_buckets
from kd.pipeline.signals import TeacherSignals

_H = 0.5 / 254  # half a u8 code step on the square-root scale

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
    assert bits_equal(enc["tail_logmass"], tail_logmass)  # the tail is stored as is


def _u8_bound(lp: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """SPEC.md section 6: |x' - x| <= G((s + h)^2 - s^2), s = sqrt(gap / G), plus float32 rounding."""
    gap = np.clip(ref[:, None].astype(np.float64) - lp, 0.0, U8_GAP_NATS)
    s = np.sqrt(gap / U8_GAP_NATS)
    rounding = 4 * np.spacing(np.abs(lp).astype(np.float32)).astype(np.float64) + 4 * np.spacing(np.float32(U8_GAP_NATS))
    return U8_GAP_NATS * ((s + _H) ** 2 - s**2) + rounding


@settings(max_examples=150, deadline=None)
@given(lp=logprob_rows(), tail=tails)
def test_u8_top1_exact_folding_and_per_entry_error_bound(lp, tail):
    n = lp.shape[0]
    tail_logmass = np.full(n, tail, np.float32)
    enc = encode_logprobs(lp, tail_logmass, "u8")
    dec = decode_logprobs(enc, "u8")
    assert dec.shape == lp.shape and dec.dtype == np.float32
    ref = enc["logprob_ref"]
    row_max = lp.max(axis=1) if n else np.zeros(0, np.float32)
    assert np.array_equal(ref, np.where(np.isfinite(row_max), row_max, 0.0))
    gap = ref[:, None].astype(np.float64) - lp
    folded = ~(gap < U8_GAP_NATS)  # -inf entries and entries 20+ nats below the top-1
    assert np.array_equal(np.isneginf(dec), folded)
    kept = ~folded
    assert np.all(np.abs(dec[kept].astype(np.float64) - lp[kept]) <= _u8_bound(lp, ref)[kept])
    top = np.isfinite(row_max)
    assert np.array_equal(dec[top, 0], lp[top, 0])  # the top-1 is exact (as a value: -0.0 may read as 0.0)
    # The folded entries' mass is added to the tail, in float32.
    moved = np.where(folded & np.isfinite(lp), lp, -np.inf).astype(np.float64)
    expect = np.logaddexp.reduce(np.concatenate([moved, tail_logmass[:, None].astype(np.float64)], 1), axis=1)
    finite = np.isfinite(expect)
    assert np.array_equal(np.isfinite(enc["tail_logmass"]), finite)
    assert np.allclose(enc["tail_logmass"][finite], expect[finite], rtol=1e-6, atol=1e-5)


@settings(max_examples=120, deadline=None)
@given(lp=logprob_rows(), tail=tails)
def test_u8_kl_over_k_plus_one_buckets_is_bounded(lp, tail):
    # Keep rows that hold some probability mass (a row of -inf with a -inf tail is no distribution).
    tail_logmass = np.full(lp.shape[0], tail, np.float32)
    live = np.isfinite(lp).any(axis=1) | np.isfinite(tail_logmass)
    lp, tail_logmass = lp[live], tail_logmass[live]
    enc = encode_logprobs(lp, tail_logmass, "u8")
    dec = decode_logprobs(enc, "u8")
    kl = kl_topk_buckets(lp, tail_logmass, dec, enc["tail_logmass"])
    assert kl.shape == (lp.shape[0],) and np.all(np.isfinite(kl))
    # Every kept bucket's log-prob moves by at most e (the row's largest per-entry bound) and the
    # tail is exact up to float32 rounding; renormalising both sides at most doubles it: KL <= 2e.
    kept = np.isfinite(dec)
    e = np.where(kept, _u8_bound(lp, enc["logprob_ref"]), 0.0).max(axis=1, initial=0.0) + 1e-5
    assert np.all(kl >= -1e-9) and np.all(kl <= 2 * e)
    assert np.all(kl <= 2 * (U8_GAP_NATS * ((1 + _H) ** 2 - 1) + 1e-5))  # <= 0.16 nats, whatever the row


# ------------------------------------------------------------------------- ids through a real cache


@st.composite
def id_samples(draw):
    """A few samples of ``[T, k]`` int32 ids drawn from a vocabulary, -1 entries, and a value coding."""
    k = draw(st.integers(1, 9))
    vocab = draw(st.sampled_from([2, 1000, 70_000, 2**31 - 1]))
    coding = draw(st.sampled_from(["fp32", "fp16", "bf16", "u8"]))
    samples = []
    for i in range(draw(st.integers(1, 4))):
        t = draw(st.integers(1, 6))
        ids = draw(hnp.arrays(np.int32, (t, k), elements=st.integers(-1, vocab - 1)))
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
                expected = np.where(~(gap < U8_GAP_NATS), -1, s.ids)
            assert got.ids.dtype == np.int32 and np.array_equal(got.ids, expected), s.sample_id
            assert np.array_equal(got.target_ids, s.target_ids)
    finally:
        root.fs.rm(root.path, recursive=True)
