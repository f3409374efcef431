"""What a cache and a cache root hold, as plain data: one manifest's summary (`kd cache inspect`)
and the caches under a root (`kd cache ls`).

The walk over a root is ``scan``, the one place that reads the manifests and plans there;
``list_caches`` is its older flat form (the rows of the first `kd cache ls --json`), kept for the
library API. How entries are shown (columns, filters, order) is ``listing.py``'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import CacheError
from .manifest import MANIFEST_FILE, PLAN_FILE, Manifest
from .storage import Location


def manifest_summary(m: Manifest, url: str) -> dict[str, Any]:
    ki = m.key_inputs
    size = m.index.size + sum(f.size for s in m.shards for f in s.files.values())
    return {
        "path": url,
        "key": m.key,
        "schema_version": m.schema_version,
        "sealed": m.sealed,
        "created": m.created,
        "teacher": m.teacher.get("name"),
        "teacher_identity": ki.get("teacher"),
        "tokenizer_hash": ki.get("tokenizer"),
        "template_hash": ki.get("template"),
        "dataset_fingerprint": ki.get("dataset"),
        "engine": ki.get("engine"),
        "signals": m.signals.to_dict(),
        "n_samples": m.samples,
        "n_tokens": m.tokens,
        "n_shards": len(m.shards),
        "bytes_on_disk": size,
        "bytes_per_token": round(size / m.tokens, 2) if m.tokens else None,
        # A child cache (SPEC.md section 11): the cache it grows and what it serves from it.
        "parent": m.parent.to_dict() if m.parent else None,
        "n_samples_served": m.samples + (m.parent.samples if m.parent else 0),
        "n_tokens_served": m.tokens + (m.parent.tokens if m.parent else 0),
    }


@dataclass(frozen=True)
class CacheEntry:
    """One directory under a cache root as `kd cache ls` shows it: sealed, unfinished or broken."""

    name: str
    path: str
    sealed: bool
    status: str  # "sealed", "unfinished build", or why the manifest could not be read
    key: str | None = None
    teacher: str | None = None
    role: str | None = None
    dataset: str | None = None
    signals: dict[str, Any] | None = None
    samples: int | None = None
    tokens: int | None = None
    bytes: int | None = None
    created: str | None = None  # ISO 8601, UTC, as the manifest holds it
    parent: str | None = None  # a child cache (a grown dataset): the cache it grows, by name
    parent_key: str | None = None
    own_samples: int | None = None  # of ``samples``, those held here (the rest: the parent chain's)
    own_tokens: int | None = None  # of ``tokens``, those held here

    @property
    def broken(self) -> bool:
        """A manifest that could not be read (``status`` says why), as opposed to a build in progress."""
        return not self.sealed and not self.status.startswith("unfinished build")

    def to_json(self) -> dict[str, Any]:
        """The `--json` record: full hashes, raw numbers, the fields of the older `list_caches` rows."""
        d: dict[str, Any] = {"path": self.path, "name": self.name, "sealed": self.sealed}
        if not self.sealed:
            d["error"] = self.status
        for k in ("key", "teacher", "role", "dataset", "signals", "samples", "tokens", "bytes", "created"):
            value = getattr(self, k)
            if self.sealed or value is not None:
                d[k] = value
        if self.sealed:
            d.update(parent=self.parent, parent_key=self.parent_key, own_samples=self.own_samples)
        return d

    def list_row(self) -> dict[str, Any]:
        """The older `list_caches` row: a sealed cache's own samples and tokens (not its parent
        chain's), and for any other entry only why it is not sealed."""
        if not self.sealed:
            error = self.status if self.broken else "unfinished build"
            return {"path": self.path, "name": self.name, "sealed": False, "error": error}
        return {"path": self.path, "name": self.name, "key": self.key, "teacher": self.teacher,
                "dataset": self.dataset, "samples": self.own_samples, "tokens": self.own_tokens,
                "bytes": self.bytes, "sealed": True, "created": self.created}


def _entry_from_manifest(m: Manifest, name: str, url: str) -> CacheEntry:
    s = manifest_summary(m, url)
    return CacheEntry(name=name, path=url, sealed=True, status="sealed", key=m.key, teacher=s["teacher"],
                      role=m.teacher.get("role"), dataset=s["dataset_fingerprint"], signals=m.signals.to_dict(),
                      samples=s["n_samples_served"], tokens=s["n_tokens_served"], bytes=s["bytes_on_disk"],
                      created=m.created, parent=m.parent.name if m.parent else None,
                      parent_key=m.parent.key if m.parent else None, own_samples=m.samples, own_tokens=m.tokens)


def _entry_from_plan(loc: Location, name: str) -> CacheEntry:
    """An unfinished build: its plan still says which teacher, dataset and signals it is for."""
    try:
        doc = json.loads(loc.read_bytes(PLAN_FILE))
        inputs = doc.get("key_inputs") or {}
        teacher = (inputs.get("teacher") or {}).get("name")
        return CacheEntry(name=name, path=loc.url, sealed=False, status="unfinished build", key=doc.get("key"),
                          teacher=teacher, dataset=inputs.get("dataset"), signals=inputs.get("signals"))
    except (ValueError, AttributeError, TypeError):
        return CacheEntry(name=name, path=loc.url, sealed=False, status="unfinished build (plan.json unreadable)")


def scan(root_url: str) -> list[CacheEntry]:
    """Every cache directly under ``root_url`` (local path or fsspec URL), sealed or being built.

    Directories that are neither (no manifest, no plan) are not caches and are skipped.
    """
    root = Location.from_url(root_url)
    found: list[CacheEntry] = []
    for name in root.listdir():
        loc = root.child(name)
        if loc.exists(MANIFEST_FILE):
            try:
                m = Manifest.from_json(loc.read_bytes(MANIFEST_FILE), f"{loc.url}/{MANIFEST_FILE}")
            except CacheError as e:
                found.append(CacheEntry(name=name, path=loc.url, sealed=False, status=str(e)))
                continue
            found.append(_entry_from_manifest(m, name, loc.url))
        elif loc.exists(PLAN_FILE):
            found.append(_entry_from_plan(loc, name))
    return found


def list_caches(root_url: str) -> list[dict[str, Any]]:
    """Every cache directly under ``root_url``, sealed or being built, as ``scan`` finds them, in
    the older flat rows (``CacheEntry.list_row``)."""
    return [e.list_row() for e in scan(root_url)]
