"""Choosing the parent of a build of a grown dataset (SPEC.md section 11).

A build whose key inputs equal a sealed cache's in everything but the dataset (same teacher,
tokenizer, template, signals, engine and schema_version) can reuse that cache's samples: those
whose (id, content hash) the new dataset still has. It then writes a child cache holding only the
other samples (new ones and changed ones) and naming the cache it grows as its parent; its key is
still that of the whole dataset, so the same build again finds the child and reuses it.

Among the caches under the same root that qualify, the one whose chain serves the most samples of
the new dataset wins (then the shorter chain, the newer, the name): a chain is only as long as the
growth steps it records, and a parent whose chain already has ``MAX_BUILD_CHAIN`` caches is not
chosen (the build is then a full one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from .errors import CacheError
from .id_lookup import SampleIdIndex
from .manifest import MANIFEST_FILE, PARENT_VERSION, Manifest
from .reader import CacheReader
from .storage import Location

log = logging.getLogger(__name__)

MAX_BUILD_CHAIN = 16  # caches a new child's parent chain may already hold


@dataclass
class ParentChoice:
    """The parent a build grows and what it leaves to do: ``todo`` = positions of the records
    the child must capture (new or changed), ``dropped`` = parent-chain ids the dataset lost."""

    name: str
    key: str
    reused: int
    tokens: int
    todo: list[int]
    dropped: list[str] = field(default_factory=list)
    chain: int = 1  # caches in the parent's chain
    created: str = ""

    def plan_entry(self) -> dict[str, Any]:
        """What ``plan.json`` records (``CacheBuild.start``) and the seal turns into the manifest's ``parent``."""
        return {"name": self.name, "key": self.key, "samples": self.reused, "tokens": self.tokens,
                "dropped": sorted(self.dropped)}


def identity_but_dataset(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k != "dataset"}


def coverage(reader: CacheReader, ids: Sequence[str], hashes: Sequence[str]) -> ParentChoice:
    """What ``reader``'s chain already holds of a dataset given as ids and content hashes."""
    rows = reader.rows_of(list(ids))
    theirs = np.array(reader.index_column("content_hash", np.maximum(rows, 0)) if len(reader) else [""] * len(ids),
                      dtype=object)
    ours = np.array(list(hashes), dtype=object)
    reused = (rows >= 0) & (theirs == ours) & (ours != "")
    tokens = int(np.sum(reader.index_column("num_tokens", rows[reused]))) if reused.any() else 0
    wanted = SampleIdIndex(pa.array(list(ids), pa.string()))
    held = reader.sample_ids
    dropped = [sid for sid, row in zip(held, wanted.rows(held)) if row < 0]
    m = reader.manifest
    return ParentChoice(reader.location.path.rstrip("/").rsplit("/", 1)[-1], reader.key, int(reused.sum()), tokens,
                        np.flatnonzero(~reused).tolist(), dropped, len(reader.chain), m.created if m else "")


def find_parent(root: Location, inputs: dict[str, Any], own_name: str, ids: Sequence[str],
                hashes: Sequence[str]) -> ParentChoice | None:
    """The best sealed cache under ``root`` to grow (None: no cache there holds any of these samples)."""
    wanted = identity_but_dataset(inputs)
    best: ParentChoice | None = None
    for name in root.listdir():
        loc = root.child(name)
        if name == own_name or not loc.exists(MANIFEST_FILE):
            continue
        try:
            m = Manifest.from_json(loc.read_bytes(MANIFEST_FILE), f"{loc.url}/{MANIFEST_FILE}")
            if m.schema_version < PARENT_VERSION or identity_but_dataset(m.key_inputs) != wanted:
                continue
            reader = CacheReader(loc.url)
        except CacheError as e:  # a broken cache is never a parent; the build goes on without it
            log.warning("not growing %s: %s", loc.url, e)
            continue
        if len(reader.chain) >= MAX_BUILD_CHAIN:
            log.info("not growing %s: its chain already holds %d caches", loc.url, len(reader.chain))
            continue
        choice = coverage(reader, ids, hashes)
        rank = (choice.reused, -choice.chain, choice.created, choice.name)
        if choice.reused and (best is None or rank > (best.reused, -best.chain, best.created, best.name)):
            best = choice
    return best
