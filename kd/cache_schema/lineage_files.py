"""The files that tie a child cache to its parent (SPEC.md section 11): where the parent lies (a
name under the child's own root, never outside it) and ``dropped.parquet``, the parent-chain
sample ids the child does not serve. Used by the sealer and the reader; neither knows the other."""

from __future__ import annotations

import os
import posixpath
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CacheCorruptError, CachePathError
from .manifest import DROPPED_FILE, FileEntry, ParentRef, check_parent_name
from .storage import Location, checksum_bytes

DROPPED_SCHEMA = pa.schema([("sample_id", pa.string())])


def dropped_bytes(sample_ids: Sequence[str]) -> bytes:
    """``dropped.parquet``: one ``sample_id`` column, zstd, ids sorted (deterministic bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"sample_id": sorted(sample_ids)}, schema=DROPPED_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def parent_ref(planned: dict[str, Any]) -> tuple[ParentRef, bytes | None]:
    """The manifest's ``parent`` from the plan's, and the bytes of ``dropped.parquet`` (None: nothing dropped)."""
    dropped = list(planned.get("dropped") or [])
    data = dropped_bytes(dropped) if dropped else None
    entry = FileEntry(len(data), checksum_bytes(data)) if data is not None else None
    ref = ParentRef(check_parent_name(planned["name"], "plan.json"), str(planned["key"]), int(planned["samples"]),
                    int(planned["tokens"]), entry, len(dropped))
    return ref, data


def read_dropped(location: Location, ref: ParentRef) -> list[str]:
    """The ids a child drops from its parent chain, checked against the manifest's size and xxh3."""
    if ref.dropped is None:
        return []
    data = location.read_bytes(DROPPED_FILE)
    if len(data) != ref.dropped.size or checksum_bytes(data) != ref.dropped.xxh3_128:
        raise CacheCorruptError(f"{location.url}/{DROPPED_FILE}: checksum or size mismatch (corrupt or truncated)")
    ids = pq.read_table(pa.BufferReader(data)).column("sample_id").to_pylist()
    if len(ids) != ref.dropped_samples:
        raise CacheCorruptError(f"{location.url}/{DROPPED_FILE}: {len(ids)} ids, the manifest says {ref.dropped_samples}")
    return ids


def parent_location(child: Location, name: str) -> Location:
    """``<root>/<name>`` beside ``child``: the name is one checked path component, and on a local
    disk the parent may not be a symbolic link (it could lead out of the root)."""
    check_parent_name(name, f"{child.url}/manifest.json")
    root = posixpath.dirname(child.path.rstrip("/"))
    loc = Location(child.fs, posixpath.join(root, name))
    if loc.path == child.path:
        raise CachePathError(f"{child.url}: a cache cannot be its own parent")
    if child.is_local and os.path.islink(loc.path):
        raise CachePathError(f"{loc.url}: parent of {child.url} is a symbolic link (refused: it could leave the root)")
    return loc
