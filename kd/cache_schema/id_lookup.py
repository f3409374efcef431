"""The index's per-sample strings without a Python object per sample: sample id -> row, and the
string columns a batch read returns (capability, token-id hashes).

A ``dict`` of sample ids plus the string columns as Python lists cost ~0.4 GB per reader at 1M
samples, and every data-loader worker ends up with its own copy of those pages, as reference
counts touch them. Here the ids stay in their Arrow array and are found through a sorted array
of their 128-bit xxh3 digests (24 bytes per sample, one ``searchsorted`` per batch): two distinct
ids would have to share a 128-bit digest to be confused (odds ~n / 2**128 per lookup, the same
trust kd puts in xxh3-128 checksums and sha256-128 token hashes), and two such ids in one index
are refused when it is opened.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

_HASH_BATCH = 1 << 16  # ids turned into Python strings at a time while hashing (bounds the transient)


def _digests(ids: Sequence[str]) -> np.ndarray:
    """xxh3-128 of each id's UTF-8, as ``S16`` (surrogatepass: a query id that is no valid UTF-8 is
    simply absent). Every digest fills its 16 bytes, so ``S16`` order and equality are exact."""
    digest = xxhash.xxh3_128_digest
    return np.array([digest(s.encode("utf-8", "surrogatepass")) for s in ids], dtype="S16")


def _combined(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array over the column's values (a single chunk as is: no copy of what the table holds)."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class SampleIdIndex:
    """Rows of the sample ids of an index column (``pa.string()``)."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        self.ids = _combined(ids)
        digests = np.empty(len(self.ids), "S16")
        for start in range(0, len(self.ids), _HASH_BATCH):
            digests[start : start + _HASH_BATCH] = _digests(self.ids.slice(start, _HASH_BATCH).to_pylist())
        self._order = np.argsort(digests, kind="stable")
        self._sorted = digests[self._order]

    def __len__(self) -> int:
        return len(self.ids)

    def duplicates(self, limit: int = 5) -> list[str]:
        """Up to ``limit`` ids that occur more than once (none in a valid index)."""
        if not (self._sorted[1:] == self._sorted[:-1]).any():
            return []
        counts = pc.value_counts(self.ids)
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(repeated) == 0:  # distinct ids, equal 128-bit digests: never seen, but never served wrong
            raise ValueError("two distinct sample ids share an xxh3-128 digest")
        return repeated.slice(0, limit).to_pylist()

    def rows(self, sample_ids: Sequence[str]) -> np.ndarray:
        """The index row of each id (int64), -1 for an id the index does not hold."""
        rows = np.full(len(sample_ids), -1, np.int64)
        if not len(sample_ids) or not len(self._sorted):
            return rows
        q = _digests(sample_ids)
        at = np.minimum(np.searchsorted(self._sorted, q), len(self._sorted) - 1)
        found = self._sorted[at] == q
        rows[found] = self._order[at[found]]
        return rows

    def row(self, sample_id: str) -> int:
        """One id's row, -1 if absent."""
        return int(self.rows([sample_id])[0]) if isinstance(sample_id, str) else -1


class StringColumn:
    """A string column of the index, read back a batch of rows at a time as ``list[str]``.

    Values of one UTF-8 length (token-id hashes) are kept as fixed-width bytes over the Arrow
    buffer itself; others (capabilities, a few distinct names) as dictionary codes.
    """

    def __init__(self, column: pa.Array | pa.ChunkedArray, where: str) -> None:
        arr = _combined(column)
        if arr.null_count:
            raise ValueError(f"{where}: {arr.null_count} null value(s)")
        self._fixed: np.ndarray | None = None
        lengths = pc.binary_length(arr)
        width = pc.max(lengths).as_py() if len(arr) else None
        uniform = width and pc.min(lengths).as_py() == width and pa.types.is_string(arr.type)
        if uniform and not pc.any(pc.ends_with(arr, "\x00")).as_py():  # S<width> would drop a trailing NUL
            start = int(np.frombuffer(arr.buffers()[1], np.int32, count=1, offset=4 * arr.offset)[0])
            self._fixed = np.frombuffer(arr.buffers()[2], f"S{width}", count=len(arr), offset=start)
        else:
            encoded = pc.dictionary_encode(arr)
            self._codes = encoded.indices.to_numpy()
            self._names = encoded.dictionary.to_pylist()

    def take(self, rows: np.ndarray | Sequence[int]) -> list[str]:
        if self._fixed is not None:
            return [v.decode() for v in self._fixed[rows]]
        names = self._names
        return [names[c] for c in self._codes[rows]]
