"""Frequency-rank coding of top-k token ids (exact, numpy only; SPEC.md section 5).

Top-k sets are dominated by a few frequent tokens (punctuation, common words) whose vocabulary
ids are scattered over the whole vocabulary. Replacing each id by its rank in a per-shard table
of distinct ids sorted by descending frequency turns frequent ids into small numbers, whose
high bits a shuffle + zstd chain then stores almost for free: 10-12% fewer id bytes on
``teacher_like_topk`` (vocabularies of 32768 and 151936; bench/cache_io.py), for any vocabulary
size and any int32 id (-1 too). Decoding is one ``np.take`` per chunk.

``u8`` caches (schema_version 3) go one step further: entries with equal value codes (a tie
group) decode to the same log-prob, so their order carries nothing. The writer sorts each tie
group by id code and stores the codes of a group as differences to the previous one, which
zstd stores in ~6% fewer bytes (``sort_ties``/``unsort_ties``; SPEC.md section 5).
"""

from __future__ import annotations

import numpy as np

ID_TABLE = "id_table"  # name of the per-shard table array
_BINCOUNT_SPAN = 1 << 24  # id ranges up to this use an O(n) bincount; wider ranges fall back to a sort
U16_CODES_MAX = 1 << 16  # tables up to this many entries store codes as uint16, larger ones as int32


def encode_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, table)`` with ``table[codes] == ids``.

    ``table`` (int32) holds the distinct values of ``ids`` by descending count, ties by ascending
    value, so the coding is deterministic. ``codes`` has the shape of ``ids`` and dtype uint16
    when the table has at most 65536 entries, else int32.
    """
    ids = np.asarray(ids, dtype=np.int32)
    flat = ids.ravel()
    if flat.size == 0:
        return np.zeros(ids.shape, np.uint16), np.zeros(0, np.int32)
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo < _BINCOUNT_SPAN:
        offset = flat - np.int32(lo)  # exact: the true difference fits (int32 wrap-around cancels)
        counts = np.bincount(offset, minlength=hi - lo + 1)
        values = np.flatnonzero(counts)  # ascending, so a stable sort breaks ties by value
        order = np.argsort(-counts[values], kind="stable")
        rank = np.zeros(hi - lo + 1, _code_dtype(len(values)))
        rank[values[order]] = np.arange(len(values))
        return rank[offset].reshape(ids.shape), (values[order] + lo).astype(np.int32)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(len(values), _code_dtype(len(values)))
    rank[order] = np.arange(len(values))
    return rank[inverse.ravel()].reshape(ids.shape), values[order].astype(np.int32)


def _code_dtype(table_len: int) -> type:
    return np.uint16 if table_len <= U16_CODES_MAX else np.int32


def decode_ids(codes: np.ndarray, table: np.ndarray, where: str = "ids") -> np.ndarray:
    """``table[codes]`` as int32; a code outside the table raises ``ValueError`` naming ``where``."""
    codes = np.asarray(codes)
    try:
        if codes.dtype.kind == "i" and codes.size and codes.min() < 0:  # take() would wrap negatives
            raise IndexError
        return np.take(np.asarray(table, np.int32), codes, mode="raise")
    except IndexError:
        raise ValueError(f"{where}: id code outside the {len(table)}-entry id_table") from None


def _run_starts(groups: np.ndarray) -> np.ndarray:
    """True where a run of equal adjacent values of each row of ``groups`` starts."""
    start = np.ones(groups.shape, bool)
    if groups.shape[1] > 1:
        start[:, 1:] = groups[:, 1:] != groups[:, :-1]
    return start


def sort_ties(codes: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(stored, order)``: in each run of equal adjacent ``groups`` values of a row, the codes sorted
    ascending and stored as differences to the previous code of the run (the run's first as is).

    ``order[r]`` is the permutation applied to row ``r`` (only ever within runs), so other
    per-entry arrays can follow it; ``groups`` itself is unchanged by it.
    """
    codes = np.asarray(codes)
    if codes.size == 0:
        return codes.copy(), np.zeros(codes.shape, np.int64)
    start = _run_starts(groups)
    run = np.cumsum(start, axis=1) - 1  # run index within the row
    key = (run.astype(np.int64) << 32) | codes.astype(np.int64)
    order = np.argsort(key, axis=1, kind="stable")
    ordered = np.take_along_axis(codes, order, axis=1)
    stored = ordered.copy()
    if codes.shape[1] > 1:
        stored[:, 1:] = np.where(start[:, 1:], ordered[:, 1:], ordered[:, 1:] - ordered[:, :-1])
    return stored, order


def unsort_ties(stored: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Codes from :func:`sort_ties`'s stored differences (in the sorted order, not the original)."""
    stored = np.asarray(stored)
    if stored.size == 0:
        return stored.copy()
    total = np.cumsum(stored, axis=1, dtype=np.int64 if stored.dtype.itemsize > 2 else np.int32)
    before = total - stored  # sum of everything before each entry: non-decreasing, as stored values are >= 0
    # ... so the running maximum of `before` at run starts is `before` at the start of each entry's run
    base = np.maximum.accumulate(np.where(_run_starts(groups), before, 0), axis=1)
    return (total - base).astype(stored.dtype)
