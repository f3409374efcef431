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
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from .codecs import decode_hidden, decode_tail, logprobs_from_codes, undelta_logprobs
from .errors import CacheCorruptError, CacheError, CacheUnsealedError
from .id_lookup import SampleIdIndex, StringColumn
from .manifest import INDEX_FILE, MANIFEST_FILE, Manifest, ShardEntry, SignalConfig, check_schema_version
from .samples import CachedBatch, CachedSample, SampleRows  # noqa: F401 - re-exported with the reader
from .shard_reader import ChunkLRU, ShardArrays, ShardSource, gather, gather_targets, read_parquet
from .storage import Location, checksum_bytes
from .summary import manifest_summary
from .writer import SHARD_INDEX_FILE, shard_commit_name
from .chain import ChainLink, open_parent, with_current_columns

DEFAULT_CACHE_BYTES = 512 << 20

class _TurnColumns:
    """The index's ``turn_starts`` / ``turn_lengths`` lists as flat numpy values plus offsets (no
    Python object per sample; see id_lookup)."""

    def __init__(self, index: pa.Table) -> None:
        import pyarrow.compute as pc

        starts, lengths = (index.column(name).combine_chunks() for name in ("turn_starts", "turn_lengths"))
        self.count = pc.list_value_length(starts).to_numpy(zero_copy_only=False).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.count)])
        self.starts = pc.list_flatten(starts).to_numpy(zero_copy_only=False).astype(np.int64)
        self.lengths = pc.list_flatten(lengths).to_numpy(zero_copy_only=False).astype(np.int64)

    def agree_with(self, num_tokens: np.ndarray) -> bool:
        """Every row has a turn, and its turns hold its ``num_tokens``."""
        per_row = np.bincount(np.repeat(np.arange(len(self.count)), self.count), weights=self.lengths,
                              minlength=len(self.count))
        return bool((self.count >= 1).all() and np.array_equal(per_row, num_tokens))

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``num_turns``, ``turn_starts``, ``turn_lengths`` of ``rows``, flat in row order (``CachedBatch``)."""
        count = self.count[rows]
        before = np.concatenate([[0], np.cumsum(count)[:-1]])
        flat = np.repeat(self.offsets[rows] - before, count) + np.arange(int(count.sum()))
        return {"num_turns": count, "turn_starts": self.starts[flat], "turn_lengths": self.lengths[flat]}


class CacheReader:
    """Open a cache by path or fsspec URL and read samples by id."""

    def __init__(self, url: str, *, allow_unsealed: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 storage_options: dict | None = None, _lru: ChunkLRU | None = None, _seen: tuple[str, ...] = ()):
        self._open_args = (str(url), {"allow_unsealed": allow_unsealed, "cache_bytes": cache_bytes,
                                      "storage_options": storage_options})
        self.location = Location.from_url(str(url), **(storage_options or {}))
        self._lru = _lru if _lru is not None else ChunkLRU(cache_bytes)  # one budget for a whole chain
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
        self.index = with_current_columns(self.index, self.location.url)
        source = ShardSource(self.location, self._lru, self.schema_version, self.signals)
        self._shards = {e.shard: ShardArrays(source, e) for e in entries}
        shard_col = self.index.column("shard").to_numpy()
        self._ids = SampleIdIndex(self.index.column("sample_id"))
        self._check_own_index(shard_col)
        # Every cache this reader serves, this one first (SPEC.md section 11): what `teachers.json` names.
        self.chain: list[ChainLink] = [ChainLink(self.location, self.manifest, len(self._ids))]
        if self.manifest is not None and self.manifest.parent is not None:
            shard_col = self._join_parent(shard_col, cache_bytes, storage_options, _seen + (self.location.url,))
        # Columns stay in Arrow / numpy memory (no Python object per sample): see id_lookup.
        try:
            self._strings = {name: StringColumn(self.index.column(name), f"index column {name!r}")
                             for name in ("capability", "input_ids_hash", "answer_ids_hash")}
        except ValueError as e:
            raise CacheCorruptError(f"{self.location.url}: {e}") from None
        self._cols = {name: self.index.column(name).to_numpy() for name in ("token_start", "num_tokens", "answer_start", "seq_len", "attn_t2v_start", "attn_t2v_keys", "attn_full_start", "attn_full_keys")}
        self._cols["shard"] = shard_col  # the reader's own numbering of every shard of the chain
        self._turns = _TurnColumns(self.index)
        if not self._turns.agree_with(self._cols["num_tokens"]):
            raise CacheCorruptError(f"{self.location.url}: index turn_lengths do not add up to num_tokens")

    def _check_own_index(self, shard_col: np.ndarray) -> None:
        """This cache's own rows: unique ids, as many as the manifest counts, within their shards."""
        try:
            duplicates = self._ids.duplicates()
        except ValueError as e:
            raise CacheCorruptError(f"{self.location.url}: {e}") from None
        if duplicates:
            raise CacheCorruptError(f"{self.location.url}: duplicate sample ids in the index: {duplicates}")
        if self.manifest is not None and len(self._ids) != self.manifest.samples:
            raise CacheCorruptError(f"{self.location.url}: index has {len(self._ids)} samples, manifest says {self.manifest.samples}")
        starts, lengths = self.index.column("token_start").to_numpy(), self.index.column("num_tokens").to_numpy()
        for shard, entry in ((s, sh.entry) for s, sh in self._shards.items()):
            mask = shard_col == shard
            if int(lengths[mask].sum()) != entry.tokens or int(mask.sum()) != entry.samples:
                raise CacheCorruptError(f"{self.location.url}: index disagrees with manifest counts of shard {shard}")
            if mask.any() and int((starts[mask] + lengths[mask]).max()) > entry.tokens:
                raise CacheCorruptError(f"{self.location.url}: index spans past the end of shard {shard}")

    def _join_parent(self, shard_col: np.ndarray, cache_bytes: int, storage_options: dict | None,
                     seen: tuple[str, ...]) -> np.ndarray:
        """Serve the parent chain's samples too (child wins, dropped ids left out); returns the shard column."""
        parent, inherited = open_parent(self, cache_bytes, storage_options, seen)
        offset = len(self._shards)
        self._shards.update({s + offset: arrays for s, arrays in parent._shards.items()})
        self.chain += parent.chain
        self.index = pa.concat_tables([self.index, parent.index.take(pa.array(inherited))])
        self._ids = SampleIdIndex(self.index.column("sample_id"))
        return np.concatenate([shard_col.astype(np.int64), parent._cols["shard"][inherited].astype(np.int64) + offset])

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
        return read_parquet(data)

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
                tables.append(read_parquet(data))
        from .writer import INDEX_SCHEMA

        return entries, signals, pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()

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

    @property
    def num_turns(self) -> np.ndarray:
        """Supervised turns of every sample, in index order (1 for a single answer; SPEC.md section 4)."""
        return self._turns.count

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
            return gather(name, token_spans)

        # Undo the row-wise delta on the samples' rows only: with random reads over a large cache
        # most chunks serve one sample, so undoing whole chunks would cost ~10x more.
        codes = undelta_logprobs(tokens("logprobs"), sig.value_coding)
        tail = decode_tail(tokens("tail_logmass"), sig.value_coding)
        ids = tokens("ids")
        targets = gather_targets(token_spans, ids)
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
            target_ids=targets,
            ids=ids,
            logprobs=logprobs_from_codes(codes, sig.value_coding, tail=tail, ref=ref),
            tail_logmass=tail,
            counts=tokens("counts") if sig.logits == "sampled" else None,
            hidden={layer: decode_hidden(tokens(f"hidden_L{layer}"), sig.hidden_coding) for layer in sig.hidden_layers},
            **self._turns.take(rows),
        )
        for kind in sig.attention_kinds:
            a0, keys = c[f"attn_{kind}_start"][rows].astype(np.int64), c[f"attn_{kind}_keys"][rows].astype(np.int64)
            spans = list(zip(shards, a0.tolist(), (a0 + n * keys).tolist()))
            batch.attention_keys[kind] = keys
            target = batch.attention_t2v if kind == "t2v" else batch.attention_full
            for layer in sig.attention_layers:
                target[layer] = decode_hidden(gather(f"attn_{kind}_L{layer}", spans), sig.attention_coding)
        return batch

    def summary(self) -> dict[str, Any]:
        """What `kd cache inspect` shows (``summary.manifest_summary``); a sealed cache only."""
        if self.manifest is None:
            raise CacheError(f"{self.location.url}: unsealed caches have no summary")
        s = manifest_summary(self.manifest, self.location.url)
        s["chain"] = [link.describe() for link in self.chain]  # this cache first, then its parents
        return s


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
