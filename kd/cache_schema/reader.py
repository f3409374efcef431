"""Reading caches: random access by sample id, batched reads (``get_batch``), and joins across teachers.

A reader trusts nothing it has not checked: the manifest must be sealed and of this
schema version, ``index.parquet`` and each shard's metadata files must match their
checksums before use, array shapes must match the manifest's counts, and every chunk's
size and crc32c are checked on read (by ``chunk_codec`` for kd's own codec chain, by zarr for
any other). Decoded chunks are kept in a bounded LRU so the repeated random reads of training
are served from memory.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .chunk_codec import ArrayMeta, decode_chunk, parse_array_meta
from .codecs import decode_hidden, logprobs_from_codes, undelta_logprobs
from .errors import CacheCorruptError, CacheError, CacheUnsealedError
from .id_coding import ID_TABLE, decode_ids, unsort_ties
from .id_lookup import SampleIdIndex, StringColumn
from .manifest import INDEX_FILE, MANIFEST_FILE, Manifest, ShardEntry, SignalConfig, check_schema_version
from .storage import Location, checksum_bytes
from .summary import manifest_summary
from .writer import SHARD_INDEX_FILE, shard_commit_name
from .zarr_io import zarr_store

DEFAULT_CACHE_BYTES = 512 << 20


@dataclass
class CachedSample:
    """One sample's cached teacher signals, decoded to float32 (see SPEC.md for the rows)."""

    sample_id: str
    capability: str
    target_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray
    answer_start: int
    seq_len: int
    input_ids_hash: str
    answer_ids_hash: str
    counts: np.ndarray | None = None
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    attention_t2v: dict[int, np.ndarray] = field(default_factory=dict)
    attention_full: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.target_ids.shape[0])


@dataclass
class CachedBatch:
    """Several samples' cached signals read together, one array per signal: token rows concatenated
    in request order (sample ``b`` owns rows ``offsets[b]:offsets[b + 1]``), and each attention map
    flattened row-major after the previous sample's (``attention_offsets``). A training loader
    reads a batch per teacher this way instead of a dozen small arrays per sample."""

    sample_ids: list[str]
    capabilities: list[str]
    num_tokens: np.ndarray  # [B] int64
    answer_start: np.ndarray  # [B] int64
    seq_len: np.ndarray  # [B] int64
    input_ids_hash: list[str]
    answer_ids_hash: list[str]
    target_ids: np.ndarray  # [N]
    ids: np.ndarray  # [N, k]
    logprobs: np.ndarray  # [N, k] float32
    tail_logmass: np.ndarray  # [N] float32
    counts: np.ndarray | None = None
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # [N, H] float32
    attention_keys: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [B] keys per sample
    attention_t2v: dict[int, np.ndarray] = field(default_factory=dict)  # flat [sum_b T_b * K_b] float32
    attention_full: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @cached_property
    def offsets(self) -> np.ndarray:
        """[B + 1] first token row of each sample, then the total."""
        return np.concatenate([[0], np.cumsum(self.num_tokens)])

    def attention_offsets(self, kind: str) -> np.ndarray:
        """[B + 1] first element of each sample's flattened ``kind`` map, then the total."""
        return np.concatenate([[0], np.cumsum(self.num_tokens * self.attention_keys[kind])])

    @cached_property
    def layout(self) -> list[SampleRows]:
        """Where each sample's rows and map elements lie in this batch's arrays."""
        tokens = self.offsets.tolist()
        maps = {kind: self.attention_offsets(kind).tolist() for kind in self.attention_keys}
        return [SampleRows(slice(tokens[b], tokens[b + 1]),
                           {kind: (slice(off[b], off[b + 1]), (tokens[b + 1] - tokens[b], int(self.attention_keys[kind][b])))
                            for kind, off in maps.items()})
                for b in range(len(self))]

    def sample(self, b: int) -> CachedSample:
        """Sample ``b`` as a ``CachedSample`` (views into this batch's arrays)."""
        rows = self.layout[b]
        t = rows.tokens
        out = CachedSample(
            sample_id=self.sample_ids[b], capability=self.capabilities[b], target_ids=self.target_ids[t],
            ids=self.ids[t], logprobs=self.logprobs[t], tail_logmass=self.tail_logmass[t],
            answer_start=int(self.answer_start[b]), seq_len=int(self.seq_len[b]),
            input_ids_hash=self.input_ids_hash[b], answer_ids_hash=self.answer_ids_hash[b],
            counts=None if self.counts is None else self.counts[t], hidden={layer: h[t] for layer, h in self.hidden.items()})
        rows.split_maps(self.attention_t2v, "t2v", out.attention_t2v)
        rows.split_maps(self.attention_full, "full", out.attention_full)
        return out


@dataclass(frozen=True)
class SampleRows:
    """One sample's part of a ``CachedBatch``: its token rows, and per attention kind its elements
    of the flattened maps with the ``[T_b, K_b]`` shape they unflatten to."""

    tokens: slice
    maps: dict[str, tuple[slice, tuple[int, int]]]

    def split_maps(self, flat: dict[int, np.ndarray], kind: str, into: dict[int, np.ndarray]) -> None:
        """This sample's ``[T_b, K_b]`` map (a view) of each layer's flattened ``kind`` maps, into ``into``."""
        if flat:
            elements, shape = self.maps[kind]
            for layer, values in flat.items():
                into[layer] = values[elements].reshape(shape)


def _read_parquet(data: bytes) -> pa.Table:
    """A parquet file's table, read once at open. Arrow's default (mimalloc) pool keeps the pages of
    the read's freed temporaries resident (~0.7 MiB per cache opened, in every process that opens
    caches, data-loader workers too); they are handed back right away (< 1 ms for a 100k-sample index)."""
    table = pq.read_table(pa.BufferReader(data))
    pa.default_memory_pool().release_unused()
    return table


class _ChunkLRU:
    """Decoded chunks keyed by (shard, array, chunk), evicted by total bytes."""

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


class _Shard:
    """Lazy access to one shard's arrays, checked against the manifest on first use."""

    def __init__(self, reader: "CacheReader", entry: ShardEntry):
        self.reader = reader
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
        return _gather(name, [(self, start, stop)])

    def _chunk(self, name: str, h: _ArrayHandle, c: int) -> np.ndarray:
        """Chunk ``c`` of an array, decoded (ids: to token ids), from the LRU or read and checked."""
        key = (self.entry.shard, name, c)
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
                if self.reader.ties_sorted:  # v3 u8: codes of a tie group are stored as differences
                    chunk = unsort_ties(chunk, undelta_logprobs(self.rows("logprobs", c * step, stop_c), "u8"))
                chunk = decode_ids(chunk, self.id_table(), f"{self.where}/ids chunk {c}")
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
            elif self.reader.schema_version >= 2:  # v2 shards always code their ids (SPEC.md, Versioning)
                raise CacheCorruptError(f"{self.where}: schema_version {self.reader.schema_version} shard has no id_table")
            self._id_table = table
        return self._id_table

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


def _gather(name: str, spans: Sequence[tuple[_Shard, int, int]]) -> np.ndarray:
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


class CacheReader:
    """Open a cache by path or fsspec URL and read samples by id."""

    def __init__(self, url: str, *, allow_unsealed: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES, storage_options: dict | None = None):
        self._open_args = (str(url), {"allow_unsealed": allow_unsealed, "cache_bytes": cache_bytes,
                                      "storage_options": storage_options})
        self.location = Location.from_url(str(url), **(storage_options or {}))
        self._lru = _ChunkLRU(cache_bytes)
        if self.location.exists(MANIFEST_FILE):
            self.manifest: Manifest | None = Manifest.from_json(self.location.read_bytes(MANIFEST_FILE), f"{self.location.url}/{MANIFEST_FILE}")
            if not self.manifest.sealed:
                raise CacheUnsealedError(f"{self.location.url}: manifest is not sealed")
            self.signals = self.manifest.signals
            self.schema_version = self.manifest.schema_version
            entries = self.manifest.shards
            self.index = self._read_index_file()
        elif not self.location.exists():
            raise CacheError(f"{self.location.url}: no such cache")
        elif allow_unsealed:
            self.manifest = None
            entries, self.signals, self.index = self._read_partial()
        else:
            raise CacheUnsealedError(
                f"{self.location.url}: cache is not sealed (build unfinished or killed); "
                "rerun `kd cache build` to resume it, or open with allow_unsealed=True"
            )
        # v3 u8 shards store each tie group's id codes sorted, as differences (SPEC.md section 5)
        self.ties_sorted = self.signals.value_coding == "u8" and self.schema_version >= 3
        self._shards = {e.shard: _Shard(self, e) for e in entries}
        # Columns stay in Arrow / numpy memory (no Python object per sample): see id_lookup.
        self._ids = SampleIdIndex(self.index.column("sample_id"))
        try:
            duplicates = self._ids.duplicates()
            self._strings = {name: StringColumn(self.index.column(name), f"index column {name!r}")
                             for name in ("capability", "input_ids_hash", "answer_ids_hash")}
        except ValueError as e:
            raise CacheCorruptError(f"{self.location.url}: {e}") from None
        if duplicates:
            raise CacheCorruptError(f"{self.location.url}: duplicate sample ids in the index: {duplicates}")
        if self.manifest is not None and len(self._ids) != self.manifest.samples:
            raise CacheCorruptError(f"{self.location.url}: index has {len(self._ids)} samples, manifest says {self.manifest.samples}")
        self._cols = {name: self.index.column(name).to_numpy() for name in ("shard", "token_start", "num_tokens", "answer_start", "seq_len", "attn_t2v_start", "attn_t2v_keys", "attn_full_start", "attn_full_keys")}
        self._check_index_against_shards()

    def __getstate__(self) -> dict[str, Any]:
        """A reader pickles as what opened it (data-loader workers under spawn / forkserver, the default
        start method from Python 3.14 on, get the dataset pickled): the other process opens the cache
        again, with every check, and an empty LRU."""
        return {"open_args": self._open_args, "samples": len(self), "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        url, kwargs = state["open_args"]
        self.__init__(url, **kwargs)
        if (len(self), self.key) != (state["samples"], state["key"]):  # an unsealed cache that moved on
            raise CacheError(f"{url}: reopened with {len(self)} samples (key {self.key or '-'}), the pickled reader "
                             f"had {state['samples']} (key {state['key'] or '-'})")

    def _read_index_file(self) -> pa.Table:
        data = self.location.read_bytes(INDEX_FILE)
        meta = self.manifest.index
        if len(data) != meta.size or checksum_bytes(data) != meta.xxh3_128:
            raise CacheCorruptError(f"{self.location.url}/{INDEX_FILE}: checksum or size mismatch (corrupt or truncated)")
        return _read_parquet(data)

    def _read_partial(self) -> tuple[list[ShardEntry], SignalConfig, pa.Table]:
        """Committed shards of an unfinished build (explicitly requested only)."""
        plan = json.loads(self.location.read_bytes("plan.json"))
        check_schema_version(plan.get("key_inputs", {}).get("schema_version"), f"{self.location.url}/plan.json")
        self.schema_version = int(plan["key_inputs"]["schema_version"])
        signals = SignalConfig.from_dict(plan["key_inputs"]["signals"])
        entries, tables = [], []
        for shard in range(len(plan["shards"])):
            if self.location.exists(shard_commit_name(shard)):
                entry = ShardEntry.from_dict(json.loads(self.location.read_bytes(shard_commit_name(shard))))
                entries.append(entry)
                data = self.location.read_bytes(f"{entry.path}/{SHARD_INDEX_FILE}")
                meta = entry.files.get(SHARD_INDEX_FILE)
                if meta is None or len(data) != meta.size or checksum_bytes(data) != meta.xxh3_128:
                    raise CacheCorruptError(f"{self.location.url}/{entry.path}/{SHARD_INDEX_FILE}: checksum or size mismatch")
                tables.append(_read_parquet(data))
        from .writer import INDEX_SCHEMA

        return entries, signals, pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()

    def _check_index_against_shards(self) -> None:
        shard_col, starts, lengths = self._cols["shard"], self._cols["token_start"], self._cols["num_tokens"]
        for shard, entry in ((s, sh.entry) for s, sh in self._shards.items()):
            mask = shard_col == shard
            if int(lengths[mask].sum()) != entry.tokens or int(mask.sum()) != entry.samples:
                raise CacheCorruptError(f"{self.location.url}: index disagrees with manifest counts of shard {shard}")
            if mask.any() and int((starts[mask] + lengths[mask]).max()) > entry.tokens:
                raise CacheCorruptError(f"{self.location.url}: index spans past the end of shard {shard}")

    # ----------------------------------------------------------------- access
    @property
    def key(self) -> str:
        return self.manifest.key if self.manifest else ""

    @property
    def sample_ids(self) -> list[str]:
        """Every sample id, in index order (a new list: for iterating, not for lookups; see ``rows_of``)."""
        return self._ids.ids.to_pylist()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, str) and self._ids.row(sample_id) >= 0

    def rows_of(self, sample_ids: Sequence[str]) -> np.ndarray:
        """The index row of each sample id (int64), -1 for one the cache does not hold."""
        return self._ids.rows(sample_ids)

    def index_column(self, name: str, rows: np.ndarray) -> list:
        """Values of the index column ``name`` (``INDEX_SCHEMA``) at ``rows``, as Python objects."""
        return self.index.column(name).take(pa.array(np.asarray(rows, np.int64))).to_pylist()

    def capability(self, sample_id: str) -> str:
        return self._strings["capability"].take([self._row(sample_id)])[0]

    def _row(self, sample_id: str) -> int:
        row = self._ids.row(sample_id)
        if row < 0:
            raise KeyError(f"sample {sample_id!r} is not in cache {self.location.url}")
        return row

    def get(self, sample_id: str) -> CachedSample:
        return self.get_batch([sample_id]).sample(0)

    def get_many(self, sample_ids: Iterable[str]) -> list[CachedSample]:
        ids = list(sample_ids)
        if not ids:
            return []
        batch = self.get_batch(ids)
        return [batch.sample(b) for b in range(len(batch))]

    def get_batch(self, sample_ids: Sequence[str]) -> CachedBatch:
        """Several samples' signals in one read: one array per signal, decoded once (``CachedBatch``)."""
        if not sample_ids:
            raise ValueError(f"{self.location.url}: get_batch needs at least one sample id")
        rows = self._ids.rows(sample_ids)
        if (rows < 0).any():
            missing = sample_ids[int(np.flatnonzero(rows < 0)[0])]
            raise KeyError(f"sample {missing!r} is not in cache {self.location.url}")
        strings = {name: column.take(rows) for name, column in self._strings.items()}
        c, sig = self._cols, self.signals
        shards = [self._shards[int(s)] for s in c["shard"][rows]]
        starts, n = c["token_start"][rows].astype(np.int64), c["num_tokens"][rows].astype(np.int64)
        token_spans = list(zip(shards, starts.tolist(), (starts + n).tolist()))

        def tokens(name: str) -> np.ndarray:
            return _gather(name, token_spans)

        # Undo the row-wise delta on the samples' rows only: with random reads over a large cache
        # most chunks serve one sample, so undoing whole chunks would cost ~10x more.
        codes = undelta_logprobs(tokens("logprobs"), sig.value_coding)
        tail = tokens("tail_logmass")
        # schema_version <= 2 u8 caches store each row's top-1; v3 derives it from the codes and the tail
        ref = tokens("logprob_ref") if sig.value_coding == "u8" and self.schema_version <= 2 else None
        batch = CachedBatch(
            sample_ids=list(sample_ids),
            capabilities=strings["capability"],
            num_tokens=n,
            answer_start=c["answer_start"][rows].astype(np.int64),
            seq_len=c["seq_len"][rows].astype(np.int64),
            input_ids_hash=strings["input_ids_hash"],
            answer_ids_hash=strings["answer_ids_hash"],
            target_ids=tokens("target_ids"),
            ids=tokens("ids"),
            logprobs=logprobs_from_codes(codes, sig.value_coding, tail=tail, ref=ref),
            tail_logmass=tail,
            counts=tokens("counts") if sig.logits == "sampled" else None,
            hidden={layer: decode_hidden(tokens(f"hidden_L{layer}"), sig.hidden_coding) for layer in sig.hidden_layers},
        )
        for kind in sig.attention_kinds:
            a0, keys = c[f"attn_{kind}_start"][rows].astype(np.int64), c[f"attn_{kind}_keys"][rows].astype(np.int64)
            spans = list(zip(shards, a0.tolist(), (a0 + n * keys).tolist()))
            batch.attention_keys[kind] = keys
            target = batch.attention_t2v if kind == "t2v" else batch.attention_full
            for layer in sig.attention_layers:
                target[layer] = decode_hidden(_gather(f"attn_{kind}_L{layer}", spans), sig.attention_coding)
        return batch

    def summary(self) -> dict[str, Any]:
        """What `kd cache inspect` shows (``summary.manifest_summary``); a sealed cache only."""
        if self.manifest is None:
            raise CacheError(f"{self.location.url}: unsealed caches have no summary")
        return manifest_summary(self.manifest, self.location.url)


class JoinedReader:
    """Several caches (one per teacher role) read together by sample id."""

    def __init__(self, readers: dict[str, CacheReader]):
        if not readers:
            raise ValueError("JoinedReader needs at least one cache")
        self.readers = readers
        ids = next(iter(readers.values())).sample_ids
        held = np.ones(len(ids), bool)
        for r in readers.values():
            held &= r.rows_of(ids) >= 0
        self.sample_ids = [s for s, h in zip(ids, held) if h]

    def get(self, sample_id: str) -> dict[str, CachedSample]:
        return {role: r.get(sample_id) for role, r in self.readers.items()}

    def get_many(self, sample_ids: Iterable[str]) -> list[dict[str, CachedSample]]:
        ids = list(sample_ids)
        per_role = {role: r.get_many(ids) for role, r in self.readers.items()}
        return [{role: samples[b] for role, samples in per_role.items()} for b in range(len(ids))]


def open_cache(url: str, **kwargs: Any) -> CacheReader:
    return CacheReader(url, **kwargs)
