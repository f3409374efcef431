"""Value and index codings of cached log-probs and hidden states (numpy only).

Codings are chosen for size at a known error: ``fp32``/``fp16``/``bf16`` are exact for that
dtype; ``u8`` quantises the gap to the row's top-1 on a square-root scale (fine resolution
near the top where the probability mass is), with a measured KL bound (SPEC.md, bench).
Log-prob rows are sorted descending, so the bit patterns of fp16/bf16 values rise along a
row: storing row-wise differences makes them compress ~25% better, exactly.
"""

from __future__ import annotations

import functools

import numpy as np

VALUE_CODINGS = ("fp32", "fp16", "bf16", "u8")
HIDDEN_CODINGS = ("fp32", "fp16", "bf16")
U8_GAP_NATS = 20.0  # entries further than this below the row's top-1 are folded into the tail
U8_PAD = 255  # code of a padding / folded entry; decodes to -inf
_U8_LEVELS = 254
# Decoded gap of each code: G * (code / 254)^2 in float32; the pad code decodes to -inf.
_U8_GAP = np.square(np.arange(256, dtype=np.float32) / _U8_LEVELS) * np.float32(U8_GAP_NATS)
_U8_GAP[U8_PAD] = np.inf


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = np.isnan(x)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _row_delta(u: np.ndarray) -> np.ndarray:
    out = u.copy()
    if u.shape[-1] > 1:
        out[..., 1:] = u[..., 1:] - u[..., :-1]  # unsigned wrap-around is exact both ways
    return out


def _row_undelta(d: np.ndarray) -> np.ndarray:
    # Accumulating in uint32 and truncating is exact (mod 2^8 / 2^16) and ~3x faster than numpy's
    # cumsum in the narrow dtype.
    return np.cumsum(d, axis=-1, dtype=np.uint32).astype(d.dtype)


def encode_logprobs(logprobs: np.ndarray, tail: np.ndarray, coding: str) -> dict[str, np.ndarray]:
    """Encode ``[N, k]`` log-probs (rows sorted descending) into the arrays SPEC.md names.

    Returns ``{"logprobs": ..., "tail_logmass": ...}`` plus ``"logprob_ref"`` for ``u8``.
    ``u8`` may move entries far below the top-1 into the tail; the returned tail includes them.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    tail = np.asarray(tail, dtype=np.float32)
    if coding == "fp32":
        return {"logprobs": lp, "tail_logmass": tail}
    if coding == "fp16":
        return {"logprobs": _row_delta(lp.astype(np.float16).view(np.uint16)), "tail_logmass": tail}
    if coding == "bf16":
        return {"logprobs": _row_delta(f32_to_bf16_bits(lp)), "tail_logmass": tail}
    if coding == "u8":
        return _encode_u8(lp, tail)
    raise ValueError(f"unknown value coding {coding!r}; expected one of {VALUE_CODINGS}")


def decode_logprobs(arrays: dict[str, np.ndarray], coding: str) -> np.ndarray:
    """Inverse of :func:`encode_logprobs` for the ``logprobs`` array (float32)."""
    return logprobs_from_codes(undelta_logprobs(arrays["logprobs"], coding), arrays.get("logprob_ref"), coding)


def undelta_logprobs(stored: np.ndarray, coding: str) -> np.ndarray:
    """The first, lossless step of decoding: undo the row-wise delta (a reader may cache its result)."""
    return stored if coding == "fp32" else _row_undelta(stored)


def logprobs_from_codes(codes: np.ndarray, ref: np.ndarray | None, coding: str) -> np.ndarray:
    """The second step of decoding: undelta'd codes (and ``logprob_ref`` for ``u8``) -> float32."""
    if coding == "fp32":
        return np.asarray(codes, dtype=np.float32)
    if coding == "fp16":  # a table lookup is ~2.5x faster than numpy's float16 -> float32 cast, same bits
        return np.take(_fp16_table(), codes)
    if coding == "bf16":
        return bf16_bits_to_f32(codes)
    if coding == "u8":
        out = np.take(_U8_GAP, codes)
        return np.subtract(np.asarray(ref, dtype=np.float32)[:, None], out, out=out)
    raise ValueError(f"unknown value coding {coding!r}")


@functools.cache
def _fp16_table() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _encode_u8(lp: np.ndarray, tail: np.ndarray) -> dict[str, np.ndarray]:
    n, k = lp.shape
    ref = lp.max(axis=1) if k else np.zeros(n, np.float32)
    ref = np.where(np.isfinite(ref), ref, 0.0).astype(np.float32)
    gap = ref[:, None] - lp
    folded = ~(gap < U8_GAP_NATS)  # also catches -inf and NaN
    codes = np.round(np.sqrt(np.clip(gap, 0.0, U8_GAP_NATS) / U8_GAP_NATS) * _U8_LEVELS)
    codes = np.where(folded, U8_PAD, codes).astype(np.uint8)
    # The mass of folded entries moves into the tail so the distribution still sums to 1.
    folded_lp = np.where(folded & np.isfinite(lp), lp, -np.inf)
    new_tail = np.logaddexp.reduce(np.concatenate([folded_lp, tail[:, None]], axis=1), axis=1)
    return {"logprobs": _row_delta(codes), "logprob_ref": ref, "tail_logmass": new_tail.astype(np.float32)}


def folded_mask(arrays: dict[str, np.ndarray], coding: str) -> np.ndarray | None:
    """Entries that the ``u8`` coding folded into the tail (their ids read as -1)."""
    if coding != "u8":
        return None
    return _row_undelta(arrays["logprobs"]) == U8_PAD


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
