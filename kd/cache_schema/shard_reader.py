"""One shard's arrays as the reader sees them: checked against the manifest on first use, chunks
decoded (and their checksums checked) on demand and kept in a bounded LRU, rows gathered across
shards. ``CacheReader`` owns these; nothing here knows the reader itself (``ShardSource`` is what
a shard needs of it)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .chunk_codec import ArrayMeta, decode_chunk, parse_array_meta
from .codecs import undelta_logprobs
from .errors import CacheCorruptError
from .id_coding import HI_FIELDS, ID_TABLE, IDS_HI, decode_ids, hi_planes, join_codes, load_table, unsort_ties
from .manifest import ShardEntry, SignalConfig
from .storage import Location, checksum_bytes
from .topk_coding import V5, V6, resolve_targets, ties_sorted
from .zarr_io import zarr_store


@dataclass
class ShardSource:
    """What every shard of one cache reads through: its location, the decoded-chunk LRU, and the
    format facts that change decoding (schema version, signals)."""

    location: Location
    _lru: "ChunkLRU"
    schema_version: int
    signals: SignalConfig

    @property
    def ties_sorted(self) -> bool:
        """Whether shards store each tie group's id codes sorted, as differences (SPEC.md section 5)."""
        return ties_sorted(self.signals.value_coding, self.signals.logits, self.schema_version)


def read_parquet(data: bytes) -> pa.Table:
    """A parquet file's table, read once at open. Arrow's default (mimalloc) pool keeps the pages of
    the read's freed temporaries resident (~0.7 MiB per cache opened, in every process that opens
    caches, data-loader workers too); they are handed back right away (< 1 ms for a 100k-sample index)."""
    table = pq.read_table(pa.BufferReader(data))
    pa.default_memory_pool().release_unused()
    return table


class ChunkLRU:
    """Decoded chunks keyed by (cache, shard, array, chunk), evicted by total bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.budget:
            return
        with self.lock:
            self.items[key] = value
            self.used += value.nbytes
            while self.used > self.budget:
                _, old = self.items.popitem(last=False)
                self.used -= old.nbytes


@dataclass(frozen=True)
class _ArrayHandle:
    """An array of a shard as ``rows`` reads it: decoded directly (``meta``) or through zarr (``zarr_array``)."""

    shape: tuple[int, ...]
    chunk_rows: int
    meta: ArrayMeta | None
    zarr_array: zarr.Array | None


class ShardArrays:
    """Lazy access to one shard's arrays, checked against the manifest on first use."""

    def __init__(self, source: ShardSource, entry: ShardEntry):
        self.reader = source
        self.entry = entry
        self._handles: dict[str, _ArrayHandle] | None = None  # array name -> handle, built on first use
        self._group: zarr.Group | None = None
        self._lock = threading.Lock()

    def _array_docs(self) -> dict[str, dict]:
        """Every array's ``zarr.json``, each checked against the manifest's size and checksum first."""
        loc, docs = self.reader.location, {}
        for rel, meta in self.entry.files.items():
            if rel.endswith("zarr.json"):
                data = loc.read_bytes(f"{self.entry.path}/{rel}")
                if len(data) != meta.size or checksum_bytes(data) != meta.xxh3_128:
                    raise CacheCorruptError(f"{loc.url}/{self.entry.path}/{rel}: checksum mismatch")
                if "/" in rel:
                    docs[rel.rsplit("/", 1)[0]] = json.loads(data)
        return docs

    def _zarr_array(self, name: str) -> zarr.Array:
        """The array through zarr (arrays whose codecs kd does not decode itself)."""
        if self._group is None:
            store = zarr_store(self.reader.location.child(self.entry.path), read_only=True)
            self._group = zarr.open_group(store=store, mode="r")
        return self._group[name]

    def _build_handles(self) -> dict[str, _ArrayHandle]:
        """Every array's shape and decoder, row counts checked against the manifest. Built once, from
        the checked ``zarr.json`` documents, which are not kept (a reader stays small)."""
        handles = {}
        for name, doc in self._array_docs().items():
            meta = parse_array_meta(doc)
            arr = None if meta is not None else self._zarr_array(name)
            shape = meta.shape if meta is not None else tuple(arr.shape)
            rows = meta.chunk_rows if meta is not None else arr.chunks[0]
            if not name.startswith("attn_") and name != ID_TABLE and shape[0] != self.entry.tokens:
                raise CacheCorruptError(f"{self.where}/{name}: {shape[0]} rows, manifest says {self.entry.tokens} tokens")
            handles[name] = _ArrayHandle(shape, rows, meta, arr)
        return handles

    def handle(self, name: str) -> _ArrayHandle:
        """The array's shape and decoder (all of the shard's arrays are checked on the first call)."""
        if self._handles is None:
            with self._lock:
                if self._handles is None:
                    self._handles = self._build_handles()
        h = self._handles.get(name)
        if h is None:
            raise CacheCorruptError(f"{self.where}: array {name!r} missing")
        return h

    @property
    def where(self) -> str:
        return f"{self.reader.location.url}/{self.entry.path}"

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an array, a new array (callers must not write into the LRU)."""
        return gather(name, [(self, start, stop)])

    def _chunk(self, name: str, h: _ArrayHandle, c: int) -> np.ndarray:
        """Chunk ``c`` of an array, decoded (ids: to token ids), from the LRU or read and checked."""
        key = (self.reader.location.path, self.entry.shard, name, c)  # a chain's caches share one LRU
        chunk = self.reader._lru.get(key)
        if chunk is not None:
            return chunk
        step = h.chunk_rows
        stop_c = min((c + 1) * step, h.shape[0])
        try:
            if h.meta is None:
                self._check_chunk_file(name, c, len(h.shape))
                chunk = h.zarr_array[c * step : stop_c]
            else:
                chunk = self._read_chunk(name, h.meta, c, stop_c - c * step)
            if name == "ids" and self.id_table() is not None:  # decoded once per chunk, then cached
                if self._has_ids_hi():  # v5, tables over 65536 ids: the codes' high bits (SPEC.md section 5)
                    chunk = join_codes(chunk, self.rows(IDS_HI, c * step, stop_c))
                if self.reader.ties_sorted:  # codes of a tie group are stored as differences
                    coding = self.reader.signals.value_coding
                    chunk = unsort_ties(chunk, undelta_logprobs(self.rows("logprobs", c * step, stop_c), coding))
                chunk = decode_ids(chunk, self.id_table(), f"{self.where}/ids chunk {c}")
            elif name == "target_ids" and self.reader.schema_version == V5:  # v5: codes into the id_table
                chunk = decode_ids(chunk, self.id_table(), f"{self.where}/target_ids chunk {c}")
        except CacheCorruptError:
            raise
        except Exception as e:  # zarr raises ValueError on crc32c mismatch, others on truncation
            raise CacheCorruptError(f"{self.where}/{name}: chunk {c} unreadable or corrupt ({e})") from None
        self.reader._lru.put(key, chunk)
        return chunk

    def id_table(self) -> np.ndarray | None:
        """The shard's ``id_table`` (``ids`` holds codes into it), or None for raw ids (older caches)."""
        if not hasattr(self, "_id_table"):
            table = None
            if f"{ID_TABLE}/zarr.json" in self.entry.files:
                n = self.handle(ID_TABLE).shape[0]
                table = self.rows(ID_TABLE, 0, n) if n else np.zeros(0, np.int32)
                if self.reader.schema_version >= V5:  # stored as differences (SPEC.md section 5)
                    table = load_table(table)
                    self._check_ids_hi(len(table))
            elif self.reader.schema_version >= 2:  # v2 shards always code their ids (SPEC.md, Versioning)
                raise CacheCorruptError(f"{self.where}: schema_version {self.reader.schema_version} shard has no id_table")
            self._id_table = table
        return self._id_table

    def _has_ids_hi(self) -> bool:
        return f"{IDS_HI}/zarr.json" in self.entry.files

    def _check_ids_hi(self, table_len: int) -> None:
        """A v5 table over 65536 ids needs the codes' high bits, in as many planes as it has bits."""
        planes = hi_planes(table_len)
        found = self.handle(IDS_HI).shape[1] if self._has_ids_hi() else 0
        if found != planes or (planes and self.handle(IDS_HI).shape[2] != -(-self.handle("ids").shape[1] // HI_FIELDS)):
            raise CacheCorruptError(f"{self.where}: a {table_len}-entry id_table needs {planes} {IDS_HI} planes, "
                                    f"the shard has {found} (or a wrong width)")

    def _read_chunk(self, name: str, meta: ArrayMeta, c: int, rows: int) -> np.ndarray:
        """A chunk of kd's codec chain, read as bytes and decoded (``chunk_codec``): a listed chunk
        must exist at its listed size, an unlisted one is all fill value and must not exist."""
        rel = f"{name}/{meta.chunk_key(c)}"
        listed = self.entry.files.get(rel)
        if listed is None:
            self._check_chunk_file(name, c, len(meta.shape))
            return meta.fill_chunk(rows)
        try:
            raw = self.reader.location.read_bytes(f"{self.entry.path}/{rel}")
        except FileNotFoundError:
            raise CacheCorruptError(f"{self.where}/{rel}: chunk file missing (deleted or truncated shard)") from None
        if len(raw) != listed.size:
            raise CacheCorruptError(f"{self.where}/{rel}: {len(raw)} bytes, the manifest lists {listed.size} (truncated?)")
        return decode_chunk(raw, meta, rows, f"{self.where}/{rel}")

    def _check_chunk_file(self, name: str, c: int, ndim: int) -> None:
        """zarr reads a missing chunk as fill_value: a chunk is present iff the manifest lists it."""
        rel = f"{name}/c/{c}" + "/0" * (ndim - 1)
        listed = rel in self.entry.files
        if listed != self.reader.location.exists(f"{self.entry.path}/{rel}"):
            problem = "missing (deleted or truncated shard)" if listed else "not listed in the manifest"
            raise CacheCorruptError(f"{self.where}/{rel}: chunk file {problem}")


def gather(name: str, spans: Sequence[tuple[ShardArrays, int, int]]) -> np.ndarray:
    """Rows ``[start, stop)`` of array ``name`` of each ``(shard, start, stop)``, concatenated into one
    new array (never a view of the LRU). Each chunk is looked up once per call, however many spans
    it serves: a batch's samples mostly share a few chunks."""
    parts, chunks = [], {}
    for shard, start, stop in spans:
        h = shard.handle(name)
        if stop > h.shape[0]:
            raise CacheCorruptError(f"{shard.where}/{name}: the index reads rows up to {stop}, the array has {h.shape[0]}")
        step = h.chunk_rows
        for c in range(start // step, (stop - 1) // step + 1):  # none when stop <= start
            chunk = chunks.get((shard, c))
            if chunk is None:
                chunk = chunks[shard, c] = shard._chunk(name, h, c)
            parts.append(chunk[max(start - c * step, 0) : stop - c * step])
    if not parts:  # only empty spans: the stored dtype and row shape (ids: the decoded dtype)
        shard = spans[0][0]
        h = shard.handle(name)
        dtype = np.int32 if name == "ids" else (h.meta.dtype if h.meta is not None else h.zarr_array.dtype)
        return np.zeros((0,) + h.shape[1:], dtype)
    return np.concatenate(parts)


def gather_targets(spans: Sequence[tuple[ShardArrays, int, int]], ids: np.ndarray) -> np.ndarray:
    """``gather("target_ids", spans)`` as token ids, given the spans' decoded ``ids`` rows: from
    schema_version 6 a target its row holds is stored as the row's column (SPEC.md section 5)."""
    stored = gather("target_ids", spans)
    if not spans or spans[0][0].reader.schema_version < V6:
        return stored
    out, at = np.empty(stored.shape, np.int32), 0
    for shard, start, stop in spans:
        n = max(stop - start, 0)
        rows = slice(at, at + n)
        out[rows] = resolve_targets(stored[rows], ids[rows], shard.id_table(), f"{shard.where}/target_ids")
        at += n
    return out
