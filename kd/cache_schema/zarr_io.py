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


def array_codecs(name: str, data: np.ndarray) -> tuple[list, list, tuple[int, ...]]:
    """(filters, compressors, chunk shape) for one cache array (choices measured by bench/cache_io.py)."""
    typesize = data.dtype.itemsize
    width = int(np.prod(data.shape[1:], dtype=np.int64)) if data.ndim > 1 else 1
    # ids chunks are sized by their decoded int32 rows (what the reader's LRU holds), not the codes
    row_bytes = (4 if name == "ids" else typesize) * width
    chunks = (chunk_rows(row_bytes, data.shape[0]),) + tuple(data.shape[1:])
    level, blocksize, shuffle_size = 3, 0, typesize
    shuffle = "shuffle"
    if name == "ids":
        # Byte shuffle for int32 codes too (tables over 65536 ids): the zero high bytes cost nothing
        # either way, and zstd models the low bytes' skew whole (bitshuffle: 7% larger at vocab 151936).
        blocksize = CHUNK_BYTES  # one zstd block per chunk: smaller and faster to decode than blosc's choice
        level = 1  # as small as level 3 on ids (9 saves 2% but encodes 40x slower), 3.5x faster to write
    elif name == "logprobs":
        level, blocksize = 1, CHUNK_BYTES  # level 1: smaller *and* 5-11x faster than 5 on the deltas
        if typesize * width <= 255:  # a whole row as blosc's "type": byte-shuffling groups each rank's bytes
            shuffle_size = typesize * width
    compressors = [zc.BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=shuffle_size, blocksize=blocksize),
                   zc.Crc32cCodec()]
    return [], compressors, chunks
