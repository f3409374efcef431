"""Summaries for `kd cache inspect` and `kd cache ls`."""

from __future__ import annotations

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


def list_caches(root_url: str) -> list[dict[str, Any]]:
    """Every cache directly under ``root_url``, sealed or being built."""
    root = Location.from_url(root_url)
    out = []
    for name in root.listdir():
        loc = root.child(name)
        if loc.exists(MANIFEST_FILE):
            try:
                m = Manifest.from_json(loc.read_bytes(MANIFEST_FILE), f"{loc.url}/{MANIFEST_FILE}")
            except CacheError as e:
                out.append({"path": loc.url, "name": name, "sealed": False, "error": str(e)})
                continue
            s = manifest_summary(m, loc.url)
            out.append({"path": loc.url, "name": name, "key": m.key, "teacher": s["teacher"], "dataset": s["dataset_fingerprint"],
                        "samples": m.samples, "tokens": m.tokens, "bytes": s["bytes_on_disk"], "sealed": True, "created": m.created})
        elif loc.exists(PLAN_FILE):
            out.append({"path": loc.url, "name": name, "sealed": False, "error": "unfinished build"})
    return out
