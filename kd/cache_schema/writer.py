"""Writing a cache: one writer per shard, atomic shard commits, and the seal.

Protocol (SPEC.md, "Writing"): the driver writes ``plan.json`` (the deterministic
sample -> shard plan) once; each shard is written under a fresh attempt directory and
becomes visible only when its ``shards/NNNNN.commit.json`` is published atomically; the
sealer joins the shard indices into ``index.parquet`` and publishes ``manifest.json`` last.
A killed build leaves only unreferenced attempt directories, which the seal removes.
The seal is safe only with one builder at a time: ``kd.pipeline.build.recipe`` holds the build
lease (``lease.py``) and passes it here so the seal checks it before deleting anything.
A full disk raises ``CacheNoSpaceError`` naming the file; nothing is committed or sealed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import re
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .chunk_codec import write_chunks
from .codecs import encode_hidden
from .errors import CacheCorruptError, CacheError
from .faults import fault_point
from .sample_check import SampleSignals, check_sample  # noqa: F401 - SampleSignals re-exported
from .key import cache_dir_name, cache_key
from .lineage_files import parent_ref
from .manifest import (
    DROPPED_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    FileEntry,
    Manifest,
    ShardEntry,
    SignalConfig,
)
from .storage import Location, checksum_bytes
from .topk_coding import encode_topk
from .turns import turns_of
from .zarr_io import array_codecs, zarr_store

if TYPE_CHECKING:
    from .lease import BuildLease

SHARD_INDEX_FILE = "index.parquet"
ATTEMPT_DIR = re.compile(r"^\d{5}-[0-9a-f]{12}$")  # shards/NNNNN-<attempt>
TEMP_FILE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")  # write_atomic's temp name
LEASE_TEMP = ".lease.json.tmp-"  # the live heartbeat's temp file: never swept


class CacheNoSpaceError(CacheError, OSError):
    """The disk (or quota) filled up while writing; nothing half-written was published."""


@contextlib.contextmanager
def _no_space(where: str, cleanup: Location | None = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into CacheNoSpaceError naming the file; drop ``cleanup`` to free space."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, CacheNoSpaceError):
            raise
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup.fs.rm(cleanup.path, recursive=True)
        err = CacheNoSpaceError(f"{e.filename or where}: no space left on device while writing {where}; nothing was "
                                "committed or sealed: free space and rerun `kd cache build` to resume")
        err.errno = e.errno
        raise err from e

INDEX_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("capability", pa.string()),
        ("shard", pa.int32()),
        ("token_start", pa.int64()),
        ("num_tokens", pa.int32()),
        ("answer_start", pa.int32()),
        ("seq_len", pa.int32()),
        ("input_ids_hash", pa.string()),
        ("answer_ids_hash", pa.string()),
        ("attn_t2v_start", pa.int64()),
        ("attn_t2v_keys", pa.int32()),
        ("attn_full_start", pa.int64()),
        ("attn_full_keys", pa.int32()),
        ("content_hash", pa.string()),  # schema_version >= 4: what the sample is (SPEC.md section 4)
        ("turn_starts", pa.list_(pa.int32())),  # schema_version >= 5: the supervised turns (SPEC.md section 4)
        ("turn_lengths", pa.list_(pa.int32())),
    ]
)


def hash_ids(ids: Sequence[int] | np.ndarray) -> str:
    """Stable digest of token ids (int32 little-endian, sha256, 32 hex) proving alignment."""
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()[:32]


def _int_lists(lists: Sequence[np.ndarray]) -> pa.ListArray:
    """One list<int32> index column from per-sample arrays, built from flat buffers (no Python ints)."""
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int32)
    values = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def shard_commit_name(shard: int) -> str:
    return f"shards/{shard:05d}.commit.json"


class ShardWriter:
    """Collects the samples of one shard and commits them as one atomic unit."""

    def __init__(self, cache: Location, shard: int, signals: SignalConfig):
        self.cache = cache
        self.shard = shard
        self.signals = signals
        self._samples: list[tuple[SampleSignals, str]] = []
        self._content_hashes: list[str] = []
        self._unchecked: list[SampleSignals] = []  # added with check=False: checked by commit

    def add(self, sample: SampleSignals, capability: str, content_hash: str = "", *, check: bool = True) -> None:
        """Queue one sample; ``content_hash`` is its record's hash ("" = unknown: never reused by a child).

        ``check=False`` defers the sample's check (``check_sample``, ~1.5 us an answer token) to
        ``commit``, which then refuses the shard before writing anything: a commit in a background
        thread takes it off the teacher's critical path.
        """
        if check:
            check_sample(sample, self.signals)
        else:
            self._unchecked.append(sample)
        if not isinstance(content_hash, str):
            raise ValueError(f"sample {sample.sample_id!r}: content_hash must be a string, got {type(content_hash).__name__}")
        fault_point("batch")  # teacher outputs in memory, nothing of this shard on disk yet
        self._samples.append((sample, capability))
        self._content_hashes.append(content_hash)

    def check_added(self) -> None:
        """Check the samples added with ``check=False`` so far, while more may be added: one thread
        adds, another (the one that commits) checks, each sample once."""
        n = len(self._unchecked)
        for sample in self._unchecked[:n]:
            check_sample(sample, self.signals)
        del self._unchecked[:n]  # add only appends: these are the n just checked

    def commit(self) -> ShardEntry:
        """Write arrays + index under a fresh attempt dir, checksum them, publish the commit file.

        Safe in another thread than the one that added the samples, once it adds no more.
        """
        if not self._samples:
            raise CacheError(f"shard {self.shard}: no samples to commit")
        self.check_added()  # those deferred by add(check=False): nothing is written yet
        rel = f"shards/{self.shard:05d}-{uuid.uuid4().hex[:12]}"
        arrays, index = self._assemble()
        where = f"shard {self.shard} ({self.cache.url}/{rel})"
        with _no_space(where, cleanup=self.cache.child(rel)):
            group = zarr.open_group(store=zarr_store(self.cache.child(rel)), mode="w", zarr_format=3)
            group.attrs.update({"kd_shard": self.shard, "kd_signals": self.signals.to_dict()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name, data in arrays.items():
                    filters, compressors, chunks = array_codecs(name, data)
                    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, filters=filters, compressors=compressors)
                    if data.size and not filters:  # kd's chain: its chunk files written directly, as zarr writes them
                        write_chunks(self.cache.child(rel), name, data, compressors[0], chunks)
                    elif data.size:
                        arr[...] = data
                    fault_point("shard_write", f"{self.cache.url}/{rel}/{name}")
            sink = pa.BufferOutputStream()
            pq.write_table(index, sink, compression="zstd")
            self.cache.write_atomic(f"{rel}/{SHARD_INDEX_FILE}", sink.getvalue().to_pybytes())
            files = {}
            for path, size in sorted(self.cache.walk_files(rel).items()):
                data = self.cache.read_bytes(path)
                files[path[len(rel) + 1 :]] = FileEntry(len(data), checksum_bytes(data))
            entry = ShardEntry(self.shard, rel, len(self._samples), int(index.column("num_tokens").to_numpy().sum()), files)
            self.cache.write_atomic(shard_commit_name(self.shard), json.dumps(entry.to_dict(), indent=1).encode())
        fault_point("after_commit")
        return entry

    def _assemble(self) -> tuple[dict[str, np.ndarray], pa.Table]:
        sig = self.signals
        samples = [s for s, _ in self._samples]
        turns = [turns_of(s) for s in samples]
        lengths = np.array([s.num_tokens if hasattr(s, "num_tokens") else len(s.target_ids) for s in samples], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ids = np.concatenate([np.asarray(s.ids, np.int32) for s in samples])
        lp = np.concatenate([np.asarray(s.logprobs, np.float32) for s in samples])
        tail = np.concatenate([np.asarray(s.tail_logmass, np.float32) for s in samples])
        targets = np.concatenate([np.asarray(s.target_ids, np.int32) for s in samples])
        # value coding, u8 folding, frequency-rank id codes (SPEC.md sections 5 and 6)
        arrays: dict[str, np.ndarray] = encode_topk(ids, lp, tail, targets, sig.value_coding, logits=sig.logits)
        if sig.logits == "sampled":
            arrays["counts"] = np.concatenate([np.asarray(s.counts, np.uint16) for s in samples])
        for layer in sig.hidden_layers:
            h = np.concatenate([np.asarray(s.hidden[layer], np.float32) for s in samples])
            arrays[f"hidden_L{layer}"] = encode_hidden(h, sig.hidden_coding)
        attn_cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind in ("t2v", "full"):
            key_counts = np.zeros(len(samples), np.int64)
            if kind in sig.attention_kinds:
                field = "attention_t2v" if kind == "t2v" else "attention_full"
                key_counts = np.array([getattr(s, field)[sig.attention_layers[0]].shape[1] for s in samples], np.int64)
                for layer in sig.attention_layers:
                    flat = np.concatenate([np.asarray(getattr(s, field)[layer], np.float32).ravel() for s in samples])
                    arrays[f"attn_{kind}_L{layer}"] = encode_hidden(flat, sig.attention_coding)
            sizes = key_counts * lengths
            attn_cols[kind] = (np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), key_counts.astype(np.int32))
        index = pa.table(
            {
                "sample_id": [s.sample_id for s in samples],
                "capability": [c for _, c in self._samples],
                "shard": np.full(len(samples), self.shard, np.int32),
                "token_start": starts.astype(np.int64),
                "num_tokens": lengths.astype(np.int32),
                "answer_start": np.array([s.answer_start for s in samples], np.int32),
                "seq_len": np.array([len(s.input_ids) for s in samples], np.int32),
                "input_ids_hash": [hash_ids(s.input_ids) for s in samples],
                "answer_ids_hash": [hash_ids(s.target_ids) for s in samples],
                "attn_t2v_start": attn_cols["t2v"][0],
                "attn_t2v_keys": attn_cols["t2v"][1],
                "attn_full_start": attn_cols["full"][0],
                "attn_full_keys": attn_cols["full"][1],
                "content_hash": self._content_hashes,
                "turn_starts": _int_lists([t[0] for t in turns]),
                "turn_lengths": _int_lists([t[1] for t in turns]),
            },
            schema=INDEX_SCHEMA,
        )
        return arrays, index


@dataclass
class BuildPlan:
    """Deterministic assignment of sample ids to shards (same inputs, same plan)."""

    shards: list[list[str]]

    @classmethod
    def from_ids(cls, sample_ids: Iterable[str], shard_size: int) -> BuildPlan:
        ids = list(sample_ids)
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        return cls([ids[i : i + shard_size] for i in range(0, len(ids), shard_size)])


class CacheBuild:
    """A cache directory under construction: plan, committed shards, seal."""

    def __init__(self, root: Location, inputs: dict[str, Any], teacher: dict[str, Any], signals: SignalConfig):
        self.inputs = inputs
        self.key = cache_key(inputs)
        self.name = cache_dir_name(inputs)
        self.location = root.child(self.name)
        self.teacher = teacher
        self.signals = signals

    @property
    def sealed(self) -> bool:
        return self.location.exists(MANIFEST_FILE)

    def start(self, plan: BuildPlan, parent: dict[str, Any] | None = None) -> None:
        """Create the directory and publish the plan; a resumed build must have the same plan.

        ``parent`` (``lineage.ParentChoice.plan_entry``) makes this a child cache: the plan's shards
        hold only the samples its parent chain lacks, and the seal names the parent in the manifest.
        """
        self.location.makedirs("shards")
        doc = {"key": self.key, "key_inputs": self.inputs, "shards": plan.shards, "parent": parent}
        if self.location.exists(PLAN_FILE):
            existing = json.loads(self.location.read_bytes(PLAN_FILE))
            if (existing.get("key") != self.key or existing.get("shards") != plan.shards
                    or existing.get("parent") != parent):
                raise CacheError(f"{self.location.url}: an unfinished build with a different plan exists; use --force")
            return
        with _no_space(f"the plan of {self.location.url}"):
            self.location.write_atomic(PLAN_FILE, json.dumps(doc).encode())

    def plan(self) -> BuildPlan:
        return BuildPlan(json.loads(self.location.read_bytes(PLAN_FILE))["shards"])

    def planned_parent(self) -> dict[str, Any] | None:
        """The parent an unfinished build planned with (None: a full build, or no plan yet)."""
        if not self.location.exists(PLAN_FILE):
            return None
        return json.loads(self.location.read_bytes(PLAN_FILE)).get("parent")

    def has_plan(self) -> bool:
        return self.location.exists(PLAN_FILE)

    def committed(self) -> dict[int, ShardEntry]:
        """Shards whose commit file exists and parses (a torn commit cannot exist: it is atomic)."""
        out = {}
        for name in self.location.listdir("shards"):
            if name.endswith(".commit.json"):
                entry = ShardEntry.from_dict(json.loads(self.location.read_bytes(f"shards/{name}")))
                out[entry.shard] = entry
        return out

    def shard_writer(self, shard: int) -> ShardWriter:
        return ShardWriter(self.location, shard, self.signals)

    def clear(self, keep: Iterable[str] = ()) -> None:
        """Delete everything of this cache but ``keep`` (names at its top), for ``--force``."""
        for name in self.location.listdir():
            if name not in set(keep):
                self.location.remove(name, recursive=True)

    def seal(self, kd_version: str, lease: BuildLease | None = None) -> Manifest:
        """Join shard indices, publish ``index.parquet`` then ``manifest.json`` (the seal).

        With ``lease`` (what ``build_cache`` passes), the lease is checked before the seal
        deletes stray attempt directories and before it publishes the manifest, so a builder
        that lost its lease (paused past the TTL) stops instead of deleting a live shard.
        """
        if self.sealed:  # never rewrite a sealed cache: a later re-commit must not move its shards
            return self._sealed_manifest()
        plan = self.plan()
        committed = self.committed()
        missing = [i for i in range(len(plan.shards)) if i not in committed]
        if missing:
            raise CacheError(f"{self.location.url}: cannot seal, shards not committed: {missing[:10]}")
        tables = []
        for i, shard_ids in enumerate(plan.shards):
            entry = committed[i]
            data = self.location.read_bytes(f"{entry.path}/{SHARD_INDEX_FILE}")
            expected = entry.files[SHARD_INDEX_FILE]
            if checksum_bytes(data) != expected.xxh3_128:
                raise CacheCorruptError(f"{self.location.url}/{entry.path}/{SHARD_INDEX_FILE}: checksum mismatch")
            table = pq.read_table(pa.BufferReader(data))
            if table.column("sample_id").to_pylist() != shard_ids:
                raise CacheCorruptError(f"{self.location.url}: shard {i} holds other samples than planned")
            tables.append(table)
        index = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()  # a child may add no samples
        sink = pa.BufferOutputStream()
        pq.write_table(index, sink, compression="zstd")
        index_bytes = sink.getvalue().to_pybytes()
        shards = [committed[i] for i in range(len(plan.shards))]
        planned_parent = self.planned_parent()
        parent, dropped_bytes = parent_ref(planned_parent) if planned_parent else (None, None)
        manifest = Manifest(
            key=self.key,
            key_inputs=self.inputs,
            signals=self.signals,
            teacher=self.teacher,
            samples=sum(s.samples for s in shards),
            tokens=sum(s.tokens for s in shards),
            shards=shards,
            index=FileEntry(len(index_bytes), checksum_bytes(index_bytes)),
            created=_now(),
            kd_version=kd_version,
            parent=parent,
        )
        if lease is not None:
            lease.check()
        if self.sealed:  # another sealer won meanwhile: its index and attempt dirs are the cache
            return self._sealed_manifest()
        with _no_space(f"the index of {self.location.url}"):
            if dropped_bytes is not None:
                self.location.write_atomic(DROPPED_FILE, dropped_bytes)
            self.location.write_atomic(INDEX_FILE, index_bytes)
        fault_point("seal_index")
        self._remove_stray_attempts({s.path.split("/", 1)[1] for s in shards})
        fault_point("before_manifest")
        if lease is not None:
            lease.check()
        with _no_space(f"the manifest of {self.location.url}"):
            self.location.write_atomic(MANIFEST_FILE, manifest.to_json())
        return manifest

    def _sealed_manifest(self) -> Manifest:
        return Manifest.from_json(self.location.read_bytes(MANIFEST_FILE), f"{self.location.url}/{MANIFEST_FILE}")

    def _remove_stray_attempts(self, keep: set[str]) -> None:
        """Delete attempt dirs no commit names and temp files of killed atomic writes.

        Only names this writer creates are touched (never an unknown file), a name that
        vanishes meanwhile is fine, and the live lease's heartbeat temp file is left alone.
        """
        stray = [f"shards/{n}" for n in self.location.listdir("shards")
                 if (ATTEMPT_DIR.match(n) and n not in keep) or TEMP_FILE.match(n)]
        stray += [n for n in self.location.listdir() if TEMP_FILE.match(n) and not n.startswith(LEASE_TEMP)]
        for rel in stray:
            with contextlib.suppress(FileNotFoundError):
                self.location.remove(rel, recursive=True)
