"""Zarr v3 plumbing: stores for any fsspec location and the codec chain of each array.

Only codecs from the zarr v3 core specification are used (bytes, blosc, zstd, crc32c), so
plain ``zarr`` reads a cache with no kd code. Every chunk ends in a crc32c checksum, so a
flipped byte in a chunk fails the read that touches it.
"""

from __future__ import annotations

import numpy as np
import zarr.codecs as zc
from numcodecs import Blosc
from zarr.storage import FsspecStore, LocalStore

from .storage import Location

CHUNK_BYTES = 1 << 20  # ~1 MiB of raw data per chunk: cheap random reads, few files
_BLOSC_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


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


# Arrays whose byte shuffle is chosen per array, by compressing a sample of them each way: which one
# is smaller depends on the coding (bf16 ids and log-probs: a whole row as blosc's "type";
# u8 ids: each code as the type; u8 log-prob deltas, ids_hi: bit shuffle), measured by bench/cache_io.py.
TRIED_ARRAYS = ("ids", "ids_hi", "logprobs")
_FAST_1D = ("tail_logmass", "target_ids")  # level 1 with one block per chunk: smaller and faster than level 3
_SAMPLE_ROWS = 4096  # rows compressed per candidate shuffle (about one chunk)


def array_codecs(name: str, data: np.ndarray) -> tuple[list, list, tuple[int, ...]]:
    """(filters, compressors, chunk shape) for one cache array (choices measured by bench/cache_io.py)."""
    typesize = data.dtype.itemsize
    width = int(np.prod(data.shape[1:], dtype=np.int64)) if data.ndim > 1 else 1
    # ids chunks are sized by their decoded int32 rows (what the reader's LRU holds), not the codes;
    # ids_hi's chunks by 4 bytes a byte of a row: 4x the rows of ids' (256 KiB at k = 64), a quarter of the files
    row_bytes = 4 * width if name == "ids" else 4 * data.shape[-1] if name == "ids_hi" else typesize * width
    chunks = (chunk_rows(row_bytes, data.shape[0]),) + tuple(data.shape[1:])
    level, blocksize, shuffle, shuffle_size = 3, 0, "shuffle", typesize
    if name in TRIED_ARRAYS:
        # level 1: as small as 3 on ids and log-prob deltas (9 saves 2% at 40x the time), 3.5-11x
        # faster; one zstd block per chunk is smaller and faster to decode than blosc's choice
        level, blocksize = 1, CHUNK_BYTES
        shuffle, shuffle_size = _smallest_shuffle(data[:_SAMPLE_ROWS], typesize, typesize * width, level, blocksize)
    elif name in _FAST_1D:
        level, blocksize = 1, CHUNK_BYTES
    compressors = [zc.BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=shuffle_size, blocksize=blocksize),
                   zc.Crc32cCodec()]
    return [], compressors, chunks


def shuffle_candidates(itemsize: int, row_bytes: int) -> list[tuple[str, int]]:
    """(shuffle, typesize) pairs tried for an array: byte and bit shuffle with each row as blosc's
    "type" (each byte position of a row, i.e. each rank column, grouped across rows) when a row
    fits blosc's 255-byte limit, and the byte shuffle of single items."""
    out = [("shuffle", row_bytes), ("bitshuffle", row_bytes)] if 1 < row_bytes <= 255 else []
    return out + [("shuffle", itemsize)] + ([("bitshuffle", itemsize)] if not out else [])


def _smallest_shuffle(sample: np.ndarray, itemsize: int, row_bytes: int, level: int, blocksize: int) -> tuple[str, int]:
    """The candidate that compresses ``sample`` smallest (the first on ties): a deterministic choice."""
    raw = np.ascontiguousarray(sample).view(np.uint8).ravel()
    best, best_size = None, None
    for shuffle, size in shuffle_candidates(itemsize, row_bytes):
        codec = Blosc(cname="zstd", clevel=level, shuffle=_BLOSC_SHUFFLE[shuffle], blocksize=blocksize, typesize=size)
        n = len(codec.encode(raw)) if raw.size else 0
        if best_size is None or n < best_size:
            best, best_size = (shuffle, size), n
    return best
