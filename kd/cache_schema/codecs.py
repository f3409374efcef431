"""Value and index codings of cached log-probs and hidden states (numpy only).

Codings are chosen for size at a known error: ``fp32``/``fp16``/``bf16`` are exact for that
dtype; ``u8`` quantises each entry's gap to the row's top-1 on a power-law scale, uniform in
``(p / p_top1) ** (1 / 3)``: a KL loss weighs an entry's error by its probability, so the
resolution follows the probability (fine near the top, coarse where the mass is negligible),
and entries 17 nats below the top-1 are folded into the tail. The row's absolute level is not
stored: the top-k entries and the tail sum to one, so it follows from the gaps and the stored
tail. Measured KL bound: SPEC.md section 6, bench/cache_io.py.
Log-prob rows are sorted descending, so the bit patterns of fp16/bf16 values rise along a
row: storing row-wise differences makes them compress ~25% better, exactly.
"""

from __future__ import annotations

import functools

import numpy as np

VALUE_CODINGS = ("fp32", "fp16", "bf16", "u8")
HIDDEN_CODINGS = ("fp32", "fp16", "bf16")
U8_FOLD_NATS = 17.0  # entries this far or further below the row's top-1 are folded into the tail
U8_BETA = 3.0  # code c stands for the gap -U8_BETA * log(1 - c / U8_LEVELS) (uniform in (p/p1)^(1/3))
U8_LEVELS = 160  # gaps below U8_FOLD_NATS take codes 0..159
U8_PAD = 255  # schema_version 1-4: code of a padding / folded entry; decodes to -inf
U8_FOLDED = U8_LEVELS  # schema_version 5: code of a folded entry (any code >= U8_LEVELS decodes to -inf)
_U8_GAP = np.full(256, np.inf, np.float32)  # decoded gap of each code
_U8_GAP[:U8_LEVELS] = -U8_BETA * np.log1p(-np.arange(U8_LEVELS) / U8_LEVELS)
_U8_WEIGHT = np.exp(-_U8_GAP.astype(np.float64))  # exp(-gap): the code's probability relative to the top-1
_MIN_TOPK_LOGMASS = -69.0  # log(1e-30): floor of the top-k's log-mass when the tail claims everything

# schema_version <= 2 u8 (read only): gap = 20 * (code / 254)^2 below a stored per-row reference.
_U8_V2_GAP = np.square(np.arange(256, dtype=np.float32) / 254) * np.float32(20.0)
_U8_V2_GAP[U8_PAD] = np.inf


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += np.uint32(0x7FFF)
    rounded += bits  # wraps only for NaN patterns, which are replaced below
    rounded >>= 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _row_delta(u: np.ndarray) -> np.ndarray:
    out = np.empty_like(u)
    out[..., :1] = u[..., :1]
    if u.shape[-1] > 1:
        np.subtract(u[..., 1:], u[..., :-1], out=out[..., 1:])  # unsigned wrap-around is exact both ways
    return out


def _row_undelta(d: np.ndarray) -> np.ndarray:
    # Accumulating in uint32 and truncating is exact (mod 2^8 / 2^16) and ~3x faster than numpy's
    # cumsum in the narrow dtype.
    return np.cumsum(d, axis=-1, dtype=np.uint32).astype(d.dtype)


def encode_logprobs(logprobs: np.ndarray, tail: np.ndarray, coding: str) -> dict[str, np.ndarray]:
    """Encode ``[N, k]`` log-probs (rows sorted descending) into the arrays SPEC.md names.

    Returns ``{"logprobs": ..., "tail_logmass": ...}``. ``u8`` may move entries far below the
    top-1 into the tail; the returned tail includes them (and the decoder needs it). ``fp16`` /
    ``bf16`` store the tail in their own dtype, as bit patterns (schema_version 6).
    """
    return encode_logprobs_codes(logprobs, tail, coding)[0]


def encode_logprobs_codes(logprobs: np.ndarray, tail: np.ndarray, coding: str, fold_code: int = U8_FOLDED, *,
                          tail_in_coding: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """:func:`encode_logprobs` plus the value codes before the row-wise delta (``u8``: gap codes;
    ``fp16`` / ``bf16``: bit patterns; ``None`` for ``fp32``): what the writer's folding and tie
    order need. ``u8`` folded entries get ``fold_code``: 160 in schema_version 5 and up (the row's
    last delta stays small), 255 before. ``tail_in_coding`` (schema_version 6 and up): ``fp16`` /
    ``bf16`` tails are stored as that dtype's bit patterns, else as float32."""
    lp = np.asarray(logprobs, dtype=np.float32)
    tail = np.asarray(tail, dtype=np.float32)
    if coding == "fp32":
        return {"logprobs": lp, "tail_logmass": tail}, None
    if coding in ("fp16", "bf16"):
        bits, out = np.empty(lp.shape, np.uint16), np.empty(lp.shape, np.uint16)
        for r0 in range(0, len(lp), _BLOCK_ROWS):  # in row blocks: the temporaries stay in the CPU's cache (2x faster)
            rows = slice(r0, r0 + _BLOCK_ROWS)
            bits[rows] = _float16_bits(lp[rows], coding)
            out[rows] = _row_delta(bits[rows])
        stored_tail = _float16_bits(tail, coding) if tail_in_coding else tail
        return {"logprobs": out, "tail_logmass": stored_tail}, bits
    if coding == "u8":
        codes, new_tail = _encode_u8(lp, tail, fold_code)
        return {"logprobs": _row_delta(codes), "tail_logmass": new_tail}, codes
    raise ValueError(f"unknown value coding {coding!r}; expected one of {VALUE_CODINGS}")


def _float16_bits(x: np.ndarray, coding: str) -> np.ndarray:
    """float32 -> the bit patterns (uint16) of ``fp16`` or ``bf16``, round to nearest even."""
    return x.astype(np.float16).view(np.uint16) if coding == "fp16" else f32_to_bf16_bits(x)


def decode_tail(stored: np.ndarray, coding: str) -> np.ndarray:
    """A stored ``tail_logmass`` as float32: schema_version 6 ``fp16`` / ``bf16`` tails are that
    dtype's bit patterns (uint16), every other tail float32 as is."""
    stored = np.asarray(stored)
    if stored.dtype != np.uint16:
        return stored.astype(np.float32, copy=False)
    if coding not in ("fp16", "bf16"):
        raise ValueError(f"a uint16 tail_logmass needs value coding fp16 or bf16, not {coding!r}")
    return logprobs_from_codes(stored, coding)


def decode_logprobs(arrays: dict[str, np.ndarray], coding: str) -> np.ndarray:
    """Inverse of :func:`encode_logprobs` for the ``logprobs`` array (float32).

    ``arrays`` holds what a shard stores: ``logprobs``, ``tail_logmass`` and, in a
    schema_version <= 2 ``u8`` cache, ``logprob_ref``.
    """
    codes = undelta_logprobs(arrays["logprobs"], coding)
    return logprobs_from_codes(codes, coding, tail=arrays.get("tail_logmass"), ref=arrays.get("logprob_ref"))


def undelta_logprobs(stored: np.ndarray, coding: str) -> np.ndarray:
    """The first, lossless step of decoding: undo the row-wise delta (a reader may cache its result)."""
    return stored if coding == "fp32" else _row_undelta(stored)


def logprobs_from_codes(codes: np.ndarray, coding: str, *, tail: np.ndarray | None = None,
                        ref: np.ndarray | None = None) -> np.ndarray:
    """The second step of decoding: undelta'd codes -> float32 log-probs.

    ``u8`` needs the rows' ``tail_logmass`` (schema_version 3) or, for older caches, their
    stored ``logprob_ref`` (the row maximum) instead.
    """
    if coding == "fp32":
        return np.asarray(codes, dtype=np.float32)
    if coding == "fp16":  # a table lookup is ~2.5x faster than numpy's float16 -> float32 cast, same bits
        return np.take(_fp16_table(), codes)
    if coding == "bf16":
        return bf16_bits_to_f32(codes)
    if coding == "u8":
        if ref is not None:
            out = np.take(_U8_V2_GAP, codes)
            return np.subtract(np.asarray(ref, dtype=np.float32)[:, None], out, out=out)
        if tail is None:
            raise ValueError("u8 log-probs decode from their codes and the rows' tail_logmass")
        top1 = _u8_top1(codes, np.asarray(tail, np.float32))
        out = np.take(_U8_GAP, codes)
        return np.subtract(top1[:, None], out, out=out)
    raise ValueError(f"unknown value coding {coding!r}")


def _u8_top1(codes: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Each row's top-1 log-prob, from its gap codes and tail: the kept entries hold mass ``1 - exp(tail)``."""
    topk_logmass = np.log(-np.expm1(np.minimum(tail.astype(np.float64), -1e-30)))
    topk_logmass = np.maximum(topk_logmass, _MIN_TOPK_LOGMASS)
    weight = np.take(_U8_WEIGHT, codes).sum(axis=1) if codes.shape[1] else np.zeros(len(codes))
    with np.errstate(divide="ignore"):
        top1 = topk_logmass - np.log(weight)
    return np.where(weight > 0, top1, 0.0).astype(np.float32)  # a row with no kept entry decodes to all -inf


@functools.cache
def _fp16_table() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


_BLOCK_ROWS = 2048  # rows per step of the encoders: their temporaries stay in the CPU's cache


def _encode_u8(lp: np.ndarray, tail: np.ndarray, fold_code: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, tail)``: each entry's gap code (``fold_code`` = folded) and the tail with the folded mass."""
    n, k = lp.shape
    codes = np.empty((n, k), np.uint8)
    new_tail = np.empty(n, np.float32)
    for r0 in range(0, n, _BLOCK_ROWS):
        block = lp[r0 : r0 + _BLOCK_ROWS]
        top1 = _row_max(block) if k else np.zeros(len(block), np.float32)
        top1 = np.where(np.isfinite(top1), top1, np.float32(0.0))
        codes[r0 : r0 + _BLOCK_ROWS], folded = _u8_codes(block, top1, fold_code)
        new_tail[r0 : r0 + _BLOCK_ROWS] = _fold_into_tail(block, tail[r0 : r0 + _BLOCK_ROWS], folded, top1)
    return codes, new_tail


def _u8_codes(lp: np.ndarray, top1: np.ndarray, fold_code: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md's float64 code formula, evaluated in float32 (3x fewer bytes per pass) and redone in
    float64 for the entries whose float32 result lies within 1e-3 of a rounding boundary (float32's
    error here is below 2e-4 codes): the same codes as float64 throughout, ~0.2% of entries redone."""
    gap = np.subtract(top1[:, None], lp)
    folded = ~(gap < np.float32(U8_FOLD_NATS))  # also catches -inf and NaN
    near = gap == np.float32(U8_FOLD_NATS)  # float32 may round a gap just below G up to G
    scaled = np.clip(gap, np.float32(0.0), np.float32(U8_FOLD_NATS), out=gap)
    scaled *= np.float32(-1.0 / U8_BETA)
    np.expm1(scaled, out=scaled)
    scaled *= np.float32(-U8_LEVELS)
    rounded = np.rint(scaled)  # round half to even
    scaled -= rounded
    np.abs(scaled, out=scaled)
    near |= scaled > np.float32(0.5 - 1e-3)
    np.fmin(rounded, np.float32(U8_LEVELS - 1), out=rounded)  # round(159.45) = 159: the clamp only guards rounding
    codes = rounded.astype(np.uint8)
    codes[folded] = fold_code
    redo = np.flatnonzero(near)
    if redo.size:
        g = top1[redo // lp.shape[1]].astype(np.float64) - lp.ravel()[redo].astype(np.float64)
        exact = np.minimum(np.round(-np.expm1(-np.clip(g, 0.0, U8_FOLD_NATS) / U8_BETA) * U8_LEVELS), U8_LEVELS - 1)
        codes.ravel()[redo] = np.where(g < U8_FOLD_NATS, exact, fold_code).astype(np.uint8)
        folded.ravel()[redo] = ~(g < U8_FOLD_NATS)
    return codes, folded


def _row_max(x: np.ndarray) -> np.ndarray:
    """``x.max(axis=1)`` by halving the row width (numpy reduces 64-wide rows ~2x slower)."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        top = np.maximum(x[:, :half], x[:, half : 2 * half])
        x = np.concatenate([top, x[:, 2 * half :]], axis=1) if x.shape[1] % 2 else top
    return x[:, 0]


def _fold_into_tail(lp: np.ndarray, tail: np.ndarray, folded: np.ndarray, top1: np.ndarray) -> np.ndarray:
    """``log(exp(tail) + sum(exp(folded finite entries)))`` per row, in float64, stored as float32.

    In float64: up to k float32 log-adds would drift by ~k ulps, and the decoder derives the
    top-1 from the tail. Only the folded entries are touched (a fifth of a teacher's row), summed
    relative to ``max(tail, top1 - G)``, above every folded entry; the rare rows whose terms all
    fall below 1e-280 of that are summed relative to their own largest term instead."""
    moved = np.flatnonzero(folded & np.isfinite(lp))
    if moved.size == 0:
        return tail.copy()
    rows = moved // lp.shape[1]
    values = lp.ravel()[moved].astype(np.float64)
    tail64 = tail.astype(np.float64)
    ref = np.maximum(tail64, top1.astype(np.float64) - U8_FOLD_NATS)
    mass = np.bincount(rows, weights=np.exp(values - ref[rows]), minlength=len(lp))
    with np.errstate(divide="ignore", invalid="ignore"):
        mass += np.exp(tail64 - ref)
        weak = np.flatnonzero((mass < 1e-280) & (np.bincount(rows, minlength=len(lp)) > 0))
        if weak.size:  # every term underflows against ref: sum against the row's own largest instead
            own = np.full(len(lp), -np.inf)
            np.maximum.at(own, rows, values)
            ref[weak] = np.maximum(own[weak], tail64[weak])
            pick = np.isin(rows, weak)
            mass[weak] = np.bincount(rows[pick], weights=np.exp(values[pick] - ref[rows[pick]]), minlength=len(lp))[weak]
            mass[weak] += np.exp(tail64[weak] - ref[weak])
        out = ref + np.log(mass)
    touched = np.zeros(len(lp), bool)
    touched[rows] = True
    return np.where(touched, out, tail64).astype(np.float32)


def folded_mask(arrays: dict[str, np.ndarray], coding: str) -> np.ndarray | None:
    """Entries that the ``u8`` coding folded into the tail (their ids read as -1)."""
    if coding != "u8":
        return None
    return _row_undelta(arrays["logprobs"]) >= U8_LEVELS


def encode_hidden(h: np.ndarray, coding: str) -> np.ndarray:
    h = np.asarray(h, dtype=np.float32)
    if coding == "fp32":
        return h
    if coding == "fp16":
        return h.astype(np.float16)
    if coding == "bf16":
        return f32_to_bf16_bits(h)
    raise ValueError(f"unknown hidden coding {coding!r}; expected one of {HIDDEN_CODINGS}")


def decode_hidden(stored: np.ndarray, coding: str) -> np.ndarray:
    if coding == "bf16":
        return bf16_bits_to_f32(stored)
    return np.asarray(stored, dtype=np.float32)


def kl_topk_buckets(p_lp: np.ndarray, p_tail: np.ndarray, q_lp: np.ndarray, q_tail: np.ndarray) -> np.ndarray:
    """Per-row KL(P || Q) over the k + 1 buckets (top-k entries + tail), in nats.

    Entries Q folded into its tail are compared against P's mass on those same entries
    moved to P's tail, which is what a loss reading the coded cache can see.
    """
    folded = ~np.isfinite(q_lp) & np.isfinite(p_lp)
    p_kept = np.where(folded, -np.inf, p_lp)
    p_tail2 = np.logaddexp.reduce(np.concatenate([np.where(folded, p_lp, -np.inf), p_tail[:, None]], 1), axis=1)
    p_all = np.concatenate([p_kept, p_tail2[:, None]], axis=1).astype(np.float64)
    q_all = np.concatenate([q_lp, q_tail[:, None]], axis=1).astype(np.float64)
    # Each side is renormalised: coding error can leave sums a hair off 1.
    p_all -= np.logaddexp.reduce(p_all, axis=1, keepdims=True)
    q_all -= np.logaddexp.reduce(q_all, axis=1, keepdims=True)
    p = np.exp(p_all)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (p_all - q_all), 0.0)
    return terms.sum(axis=1)
