"""Reading a chain of caches as one: a child cache (a grown dataset's new or changed samples)
served together with its parent's samples (SPEC.md section 11).

``CacheReader`` opens the parent (recursively: the parent may have a parent too) with the child's
decoded-chunk budget, checks that it is the cache the child was built on (its key, signals and key
inputs but the dataset) and takes every parent row whose id the child neither holds (the child's
version wins) nor drops. Nothing here imports the reader: it passes its own class in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import CacheCorruptError, CacheError
from .lineage_files import parent_location, read_dropped
from .manifest import PARENT_VERSION, Manifest
from .storage import Location
from .writer import INDEX_SCHEMA

MAX_CHAIN = 64  # links a reader follows; a longer chain (or a cycle in edited manifests) is refused


@dataclass(frozen=True)
class ChainLink:
    """One cache of a reader's chain: where it is, its manifest, and how many samples it holds itself."""

    location: Location
    manifest: Manifest | None
    samples: int

    @property
    def name(self) -> str:
        return self.location.path.rstrip("/").rsplit("/", 1)[-1]

    def describe(self) -> dict[str, Any]:
        """What a run directory records of each cache it read (``teachers.json``)."""
        m = self.manifest
        return {"name": self.name, "url": self.location.url, "key": m.key if m else "",
                "samples": self.samples, "parent": m.parent.name if m and m.parent else None}


def with_current_columns(table: pa.Table, where: str) -> pa.Table:
    """An index in ``INDEX_SCHEMA``'s columns: caches before schema_version 4 get ``content_hash`` "",
    before 5 one turn per sample (``turn_starts`` = [answer_start], ``turn_lengths`` = [num_tokens])."""
    if "content_hash" not in table.column_names:
        table = table.append_column("content_hash", pa.array([""] * table.num_rows, pa.string()))
    if "turn_starts" not in table.column_names:
        one_each = pa.array(np.arange(table.num_rows + 1, dtype=np.int32))
        for name, source in (("turn_starts", "answer_start"), ("turn_lengths", "num_tokens")):
            values = table.column(source).combine_chunks().cast(pa.int32()) if source in table.column_names else None
            if values is None:
                break  # a malformed index: the select below names what is missing
            table = table.append_column(name, pa.ListArray.from_arrays(one_each, values))
    try:
        return table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    except (KeyError, pa.ArrowInvalid, ValueError) as e:
        raise CacheCorruptError(f"{where}: index columns do not match the format ({e})") from None


def open_parent(child: Any, cache_bytes: int, storage_options: dict | None,
                seen: tuple[str, ...]) -> tuple[Any, np.ndarray]:
    """The child's parent, opened and checked, and the parent rows the child serves (int64, in order).

    ``child`` is a ``CacheReader`` whose own index is read; the parent is opened with its class."""
    ref = child.manifest.parent
    me = f"cache {child.location.url}"
    loc = parent_location(child.location, ref.name)
    if loc.url in seen or len(seen) >= MAX_CHAIN:
        raise CacheCorruptError(f"{me}: parent {ref.name} makes a cycle or a chain over {MAX_CHAIN} caches")
    try:
        parent = type(child)(loc.url, cache_bytes=cache_bytes, storage_options=storage_options,
                             _lru=child._lru, _seen=seen)
    except CacheError as e:
        raise type(e)(f"{me} grows parent cache {ref.name}, which cannot be read: {e}") from None
    if parent.key != ref.key:
        raise CacheCorruptError(f"{me} was built on parent {parent.location.url} with key {ref.key[:16]}…, which now "
                                f"has key {parent.key[:16]}… (replaced?); rebuild the child with --no-reuse")
    same = {k: v for k, v in child.manifest.key_inputs.items() if k != "dataset"}
    theirs = {k: v for k, v in parent.manifest.key_inputs.items() if k != "dataset"}
    if parent.schema_version < PARENT_VERSION or parent.signals != child.signals or same != theirs:
        raise CacheCorruptError(f"{me}: parent {parent.location.url} was built with other key inputs than the child "
                                f"(teacher, tokenizer, template, signals, engine or schema_version differ)")
    keep = np.ones(len(parent), bool)
    own = parent.rows_of(child.index.column("sample_id").to_pylist())
    keep[own[own >= 0]] = False  # the child's version wins
    dropped_ids = read_dropped(child.location, ref)
    dropped = parent.rows_of(dropped_ids)
    if (dropped < 0).any():
        missing = dropped_ids[int(np.flatnonzero(dropped < 0)[0])]
        raise CacheCorruptError(f"{me}: dropped sample {missing!r} is not in parent cache {parent.location.url}")
    keep[dropped] = False
    inherited = np.flatnonzero(keep).astype(np.int64)
    tokens = int(parent._cols["num_tokens"][inherited].sum())
    if len(inherited) != ref.samples or tokens != ref.tokens:
        raise CacheCorruptError(f"{me}: takes {len(inherited)} samples ({tokens} tokens) from parent "
                                f"{parent.location.url}, its manifest says {ref.samples} ({ref.tokens} tokens)")
    return parent, inherited
