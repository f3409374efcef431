"""Zarr v3 plumbing: stores for any fsspec location and the codec chain of each array.

Only codecs from the zarr v3 core specification are used (bytes, blosc, zstd, crc32c), so
plain ``zarr`` reads a cache with no kd code. Every chunk ends in a crc32c checksum, so a
flipped byte in a chunk fails the read that touches it.
"""

from __future__ import annotations

import numpy as np
import zarr.codecs as zc
from zarr.storage import FsspecStore, LocalStore

from .storage import Location

CHUNK_BYTES = 1 << 20  # ~1 MiB of raw data per chunk: cheap random reads, few files


def zarr_store(location: Location, *, read_only: bool = False):
    """A zarr store on ``location``, opened with the same storage options (endpoint, profile).

    zarr needs an asynchronous filesystem instance, so it opens its own from the URL; passing
    the location's options on keeps both on the same endpoint and credentials source.
    """
    if location.is_local:
        return LocalStore(location.path, read_only=read_only)
    options = {k: v for k, v in getattr(location.fs, "storage_options", {}).items() if k != "asynchronous"}
    return FsspecStore.from_url(location.url, storage_options=options, read_only=read_only)


def chunk_rows(row_bytes: int, n_rows: int) -> int:
    """Rows per chunk: a power of two near CHUNK_BYTES, never more than the array needs."""
    rows = 1 << max(8, min(20, int(np.log2(max(1, CHUNK_BYTES // max(1, row_bytes))))))
    return max(1, min(rows, max(1, n_rows)))


# Top-k arrays whose columns differ in distribution (rank 0 vs rank 63): stored column-major
# inside each chunk (the core ``transpose`` codec), so zstd sees one column's values together.
_COLUMN_MAJOR = ("ids", "logprobs")


def array_codecs(name: str, data: np.ndarray) -> tuple[list, list, tuple[int, ...]]:
    """(filters, compressors, chunk shape) for one cache array (choices measured by bench/cache_io.py)."""
    typesize = data.dtype.itemsize
    row_bytes = typesize * int(np.prod(data.shape[1:], dtype=np.int64)) if data.ndim > 1 else typesize
    chunks = (chunk_rows(row_bytes, data.shape[0]),) + tuple(data.shape[1:])
    filters = [zc.TransposeCodec(order=(1, 0))] if name in _COLUMN_MAJOR and data.ndim == 2 else []
    # int32 id codes (tables over 65536 ids) have mostly-zero high bits: bitshuffle drops them;
    # uint16 id codes and everything else compress better byte-shuffled.
    shuffle = "bitshuffle" if name == "ids" and typesize == 4 else "shuffle"
    # log-prob deltas: level 1 is smaller *and* 5-11x faster than 5; id codes: level 3 on 256 KiB
    # blocks is as small as level 5 (whose automatic blocks are that size) and ~1.5x faster (bench)
    level = 1 if name == "logprobs" else 3
    blocksize = 1 << 18 if name == "ids" else 0
    compressors = [zc.BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=typesize, blocksize=blocksize),
                   zc.Crc32cCodec()]
    return filters, compressors, chunks
