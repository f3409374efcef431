"""Cache keys: a hash of everything that changes a cache's bytes, and nothing else.

Key inputs are canonical JSON (sorted keys); worker count, host, paths and time never enter.
A cache directory is named ``<teacher-slug>-<key[:16]>`` so people can read it and tools can
find it from the inputs alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from .manifest import SCHEMA_VERSION, SignalConfig


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_inputs(
    *,
    teacher: dict[str, Any],
    tokenizer_hash: str,
    template_hash: str,
    dataset_fingerprint: str,
    signals: SignalConfig,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The declarative spec that is hashed into a key.

    ``teacher`` identifies the weights (a content hash, or name + revision); ``engine`` holds
    what changes numerics (engine kind, dtype), not where it ran.
    """
    for name, value in (("tokenizer_hash", tokenizer_hash), ("template_hash", template_hash), ("dataset_fingerprint", dataset_fingerprint)):
        if not value:
            raise ValueError(f"cache key input {name} is empty")
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher,
        "tokenizer": tokenizer_hash,
        "template": template_hash,
        "dataset": dataset_fingerprint,
        "signals": signals.to_dict(),
        "engine": engine or {},
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(inputs)).hexdigest()


def cache_dir_name(inputs: dict[str, Any]) -> str:
    teacher = inputs.get("teacher", {})
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(teacher.get("name", "teacher"))).strip("-.")[:48] or "teacher"
    return f"{slug}-{cache_key(inputs)[:16]}"
