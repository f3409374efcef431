"""Frequency-rank coding of top-k token ids (exact, numpy only; SPEC.md section 5).

Top-k sets are dominated by a few frequent tokens (punctuation, common words) whose vocabulary
ids are scattered over the whole vocabulary. Replacing each id by its rank in a per-shard table
of distinct ids sorted by descending frequency turns frequent ids into small numbers, whose
high bits a shuffle + zstd chain then stores almost for free, for any vocabulary size and any
int32 id (-1 too). Decoding is one ``np.take`` per chunk.

schema_version 5 (``IdRanks``, ``split_codes``): codes are always stored as their low 16 bits
(uint16) plus, for tables over 65536 ids (vocabularies of 150k+), the bits above in ``ids_hi``,
two bits per entry packed four to a byte. zstd's literal coder is Huffman on bytes, which spends
at least a bit per byte: the high bits of a 151936-entry table (values 0..2) cost 2 bits per
entry in an int32 code's third byte, ~1.4 packed (bench/cache_io.py). The targets are coded
through the same table, and the table is stored as differences, its ids in ascending runs (ids
whose counts agree in their 3 leading bits share a run).

``u8`` caches (schema_version >= 3): entries with equal value codes (a tie group) decode to the
same log-prob, so their order carries nothing. The writer sorts each tie group by id code and
stores the codes of a group as differences to the previous one (``sort_ties``/``unsort_ties``).
"""

from __future__ import annotations

import numpy as np

ID_TABLE = "id_table"  # name of the per-shard table array
IDS_HI = "ids_hi"  # schema_version >= 5: bits 16 and up of the id codes, packed (tables over 65536 ids)
_BINCOUNT_SPAN = 1 << 24  # id ranges up to this use an O(n) bincount; wider ranges fall back to a sort
U16_CODES_MAX = 1 << 16  # tables up to this many entries store codes as uint16 (in v2-v4 larger ones as int32)
HI_FIELD_BITS = 2  # ids_hi: bits per packed field
HI_FIELDS = 4  # ids_hi: fields per byte
_CLASS_BITS = 3  # v5 table order: counts compared on their 3 leading binary digits
_COUNT_BLOCK = 1 << 18  # ids counted per bincount call


def encode_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """schema_version 2-4's coding: ``(codes, table)`` with ``table[codes] == ids``.

    ``table`` (int32) holds the distinct values of ``ids`` by descending count, ties by ascending
    value. ``codes`` has the shape of ``ids`` and dtype uint16 when the table has at most 65536
    entries, else int32. (kd writes schema_version 5, ``IdRanks``; tests write older shards with this.)
    """
    ids = np.asarray(ids, dtype=np.int32)
    values, counts, rank_of = _distinct_counts(ids.ravel(), np.zeros(0, np.int32))
    order = np.argsort(-counts, kind="stable")  # values ascend, so a stable sort breaks ties by value
    codes = rank_of(order, _code_dtype(len(values)), 0)
    return codes.reshape(ids.shape), values[order].astype(np.int32)


class IdRanks:
    """schema_version 5's table of a shard's ids and targets, and each id's code in it.

    ``table`` (int32) holds the distinct values of ``ids`` and ``targets`` by descending count
    class (the count rounded down to its 3 leading binary digits), ties by ascending value:
    frequent ids get small codes, and ids of about equal frequency ascending runs whose
    differences are small. ``codes(x)`` is uint32 (``split_codes`` stores them).
    """

    def __init__(self, ids: np.ndarray, targets: np.ndarray):
        parts = [a for a in (np.asarray(ids, np.int32).ravel(), np.asarray(targets, np.int32).ravel()) if a.size]
        self._lo = min((int(a.min()) for a in parts), default=0)
        hi = max((int(a.max()) for a in parts), default=0)
        self._rank = None
        if hi - self._lo >= _BINCOUNT_SPAN:  # ids spread over more than 2^24: sorted lookups (strange data only)
            values, counts = np.unique(np.concatenate(parts), return_counts=True)
            self.table = values[np.argsort(-_count_class(counts), kind="stable")].astype(np.int32)
            self._sorted = np.argsort(self.table, kind="stable")
            return
        # ids index the lookup directly, negative ones from its end (numpy's wrap-around), unless
        # they lie far from 0: then by their offset from the smallest
        self._direct = self._lo < 0 or hi < _BINCOUNT_SPAN
        base = min(self._lo, 0) if self._direct else self._lo
        counts = np.zeros(hi - base + 1, np.int64)
        for a in parts:  # in blocks: bincount's int64 copy of its input stays in the CPU's cache
            for b0 in range(0, a.size, _COUNT_BLOCK):
                block = a[b0 : b0 + _COUNT_BLOCK]
                counts += np.bincount(block - np.int32(base) if base else block, minlength=hi - base + 1)
        values = np.flatnonzero(counts)
        order = np.argsort(-_count_class(counts[values]), kind="stable")  # values ascend: ties by value
        self.table = (values[order] + base).astype(np.int32)
        self._rank = np.zeros(max(hi + 1, 0) + max(0, -self._lo) if self._direct else hi - self._lo + 1, np.uint32)
        self._rank[self._index(self.table)] = np.arange(len(self.table))

    def _index(self, x: np.ndarray) -> np.ndarray:
        return x if self._direct else x - np.int32(self._lo)

    def codes(self, x: np.ndarray) -> np.ndarray:
        """The codes (uint32) of ``x``, each of which is in the table (ids or targets given)."""
        x = np.asarray(x, np.int32)
        if self._rank is not None:
            return self._rank[self._index(x)]
        return self._sorted[np.searchsorted(self.table[self._sorted], x)].astype(np.uint32)


def _count_class(counts: np.ndarray) -> np.ndarray:
    """Counts rounded down to their ``_CLASS_BITS`` leading binary digits (exact integer arithmetic)."""
    counts = counts.astype(np.int64)
    length = np.frexp(counts.astype(np.float64))[1]  # bit length (exact below 2^53)
    shift = np.maximum(length - _CLASS_BITS, 0)
    return (counts >> shift) << shift


def _distinct_counts(flat: np.ndarray, extra: np.ndarray):
    """``(values, counts, rank_of)``: the distinct values of ``flat`` and ``extra`` ascending, their
    counts, and ``rank_of(order, dtype, which)`` giving each element of ``flat`` (``which`` 0) or
    ``extra`` (1) its position in ``values[order]``."""
    arrays = (flat, extra)
    parts = [a for a in arrays if a.size]
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), lambda order, dtype, which: np.zeros(arrays[which].shape, dtype)
    lo = min(int(a.min()) for a in parts)
    hi = max(int(a.max()) for a in parts)
    if hi - lo < _BINCOUNT_SPAN:
        # exact: the true difference fits in int32 (wrap-around cancels); computed once per array
        offsets = [a - np.int32(lo) if lo else a for a in arrays]
        counts = sum(np.bincount(o, minlength=hi - lo + 1) for o in offsets if o.size)
        values = np.flatnonzero(counts)

        def rank_of(order, dtype, which):
            rank = np.zeros(hi - lo + 1, dtype)
            rank[values[order]] = np.arange(len(values))
            return rank[offsets[which]]

        return (values + lo).astype(np.int32), counts[values], rank_of
    values, counts = np.unique(np.concatenate(arrays), return_counts=True)

    def rank_of(order, dtype, which):
        rank = np.empty(len(values), dtype)
        rank[order] = np.arange(len(values))
        return rank[np.searchsorted(values, arrays[which])]

    return values, counts, rank_of


def _code_dtype(table_len: int) -> type:
    return np.uint16 if table_len <= U16_CODES_MAX else np.int32


def hi_planes(table_len: int) -> int:
    """``ids_hi``'s planes for a table: two code bits each above the low 16 (0: no ``ids_hi``)."""
    bits = max(int(table_len) - 1, 0).bit_length()
    return max(0, -(-(bits - 16) // HI_FIELD_BITS))


def split_codes(codes: np.ndarray, table_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(low, high)``: ``low`` = the codes' low 16 bits (uint16 [N, k]); ``high`` = ``None`` for
    tables of at most 65536 ids, else uint8 [N, P, ceil(k / 4)] holding bits ``16 + 2p`` and
    ``17 + 2p`` of entry j in plane p, byte j // 4, bits ``2 * (j % 4)`` and up (SPEC.md section 5)."""
    planes = hi_planes(table_len)
    n, k = codes.shape
    low = codes.astype(np.uint16)
    if planes == 0:
        return low, None
    high = np.empty((n, planes, -(-k // HI_FIELDS)), np.uint8)
    pack_high(codes, high)
    return low, high


def pack_high(codes: np.ndarray, high: np.ndarray) -> None:
    """Write ``split_codes``'s ``high`` planes of ``codes`` into ``high``."""
    n, k = codes.shape
    planes, width = high.shape[1], high.shape[2]
    rest = (codes >> 16).astype(np.uint16 if planes > 4 else np.uint8)
    if width * HI_FIELDS != k:
        rest = np.concatenate([rest, np.zeros((n, width * HI_FIELDS - k), rest.dtype)], axis=1)
    for p in range(planes):
        field = (rest >> (HI_FIELD_BITS * p) if p else rest).reshape(n, width, HI_FIELDS)
        if p + 1 < planes:
            field = field & 3
        packed = field[..., 0].astype(np.uint8)
        for f in range(1, HI_FIELDS):
            packed |= field[..., f].astype(np.uint8) << np.uint8(HI_FIELD_BITS * f)
        high[:, p] = packed


def join_codes(low: np.ndarray, high: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`split_codes`: uint16 codes as they are, else uint32 ``low | high << 16``."""
    if high is None:
        return low
    n, k = low.shape
    codes = None
    for p in range(high.shape[1]):  # each byte's 4 fields at once, already shifted into place
        fields = _HIGH_FIELDS[p][high[:, p]].reshape(n, high.shape[2] * HI_FIELDS)
        fields = fields if fields.shape[1] == k else np.ascontiguousarray(fields[:, :k])
        if codes is None:
            codes = fields
        else:
            codes |= fields
    if codes is None:  # no planes
        return low.astype(np.uint32)
    codes |= low
    return codes


def _high_fields(plane: int) -> np.ndarray:
    """[256, 4] uint32: the 4 two-bit fields of each byte value, shifted to bits ``16 + 2 * plane``."""
    byte = np.arange(256, dtype=np.uint32)[:, None]
    return ((byte >> (HI_FIELD_BITS * np.arange(HI_FIELDS, dtype=np.uint32))) & 3) << np.uint32(16 + HI_FIELD_BITS * plane)


_HIGH_FIELDS = [_high_fields(p) for p in range(8)]  # codes below 2^32: at most 8 planes


def store_table(table: np.ndarray) -> np.ndarray:
    """schema_version 5's stored ``id_table``: differences of consecutive entries, mod 2^32 (int32)."""
    table = np.asarray(table, np.int32)
    out = table.copy()
    if len(table) > 1:
        out[1:] = table[1:] - table[:-1]  # int32 wrap-around is exact both ways
    return out


def load_table(stored: np.ndarray) -> np.ndarray:
    """Inverse of :func:`store_table`: cumulative sums mod 2^32."""
    return np.cumsum(np.asarray(stored, np.int64)).astype(np.int32) if len(stored) else np.zeros(0, np.int32)


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
        np.not_equal(groups[:, 1:], groups[:, :-1], out=start[:, 1:])
    return start


def sort_ties(codes: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(stored, ordered)``: in each run of equal adjacent ``groups`` values of a row, the codes
    sorted ascending (``ordered``) and stored as differences to the previous code of the run (the
    run's first as is); both of the codes' dtype.

    Entries move only within their runs, so ``groups`` is unchanged by the reordering. One sort
    of ``run << bits | code`` keys per row; the run key is ``groups`` itself where it never falls
    along a row (u8 codes of rows sorted by descending log-prob), else the run's index.
    """
    codes = np.asarray(codes)
    groups = np.asarray(groups)
    if codes.size == 0:
        return codes.copy(), codes.copy()
    n, k = codes.shape
    code_bits = max(int(codes.max()).bit_length(), 1)
    if k == 1 or bool((groups[:, 1:] >= groups[:, :-1]).all()):
        run, run_bits = groups, max(int(groups.max()).bit_length(), 1)
    else:
        run, run_bits = np.cumsum(_run_starts(groups), axis=1, dtype=np.int32), max(k.bit_length(), 1)
    key_dtype = np.uint32 if code_bits + run_bits <= 32 else np.uint64
    key = run.astype(key_dtype) << key_dtype(code_bits)
    key |= codes.astype(key_dtype, copy=False)
    key.sort(axis=1)
    # stored = key - base, base = the previous key in the same run, else the run's own key bits
    # (the previous key is smaller than those when the run changes: run keys rise along a row)
    base = key & key_dtype(~((1 << code_bits) - 1) & np.iinfo(key_dtype).max)
    ordered = (key - base).astype(codes.dtype)  # each code, in the new order
    np.maximum(base[:, 1:], key[:, :-1], out=base[:, 1:])
    key -= base
    return key.astype(codes.dtype), ordered


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
