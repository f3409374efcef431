"""The manifest: a cache's identity, signal layout, counts and per-file checksums.

Written last, atomically, by the sealer; its presence with ``sealed: true`` is what makes a
cache readable. Parsed as plain JSON into typed dataclasses and validated before use.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from kd import __version__

from .errors import CacheCorruptError, CachePathError, SchemaVersionError
from .storage import safe_relpath

SCHEMA_VERSION = 6  # 2: id codes + id_table; 3: u8 power-law scale; 4: content_hash, parent; 5: turns; 6: smaller top-k (SPEC.md, Versioning)
FORMAT_NAME = "kd-teacher-cache"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"
PLAN_FILE = "plan.json"
DROPPED_FILE = "dropped.parquet"


SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3, 4, 5, SCHEMA_VERSION)  # v1 shards hold raw int32 ids, v1/v2 u8 a logprob_ref
PARENT_VERSION = 4  # the first schema_version with per-sample content hashes and parent caches
# A parent is named by its directory name under the same root: one plain path component.
PARENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def check_schema_version(found: Any, where: str) -> None:
    """Refuse a cache written in a format version this kd does not read, rather than guess at it."""
    if isinstance(found, bool) or found not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        raise SchemaVersionError(
            f"{where}: cache schema_version {found!r} found, this kd ({__version__}) reads schema_version "
            f"{supported}; read it with the kd that wrote it, or rebuild the cache with this one"
        )


@dataclass(frozen=True)
class SignalConfig:
    """What was captured per answer token and how it is coded (all of it enters the key)."""

    logits: str = "topk"  # "topk" | "sampled"
    top_k: int = 64  # k for top-k; max distinct ids per row for sampled
    value_coding: str = "fp16"
    sampled_draws: int = 0
    hidden_layers: tuple[int, ...] = ()
    hidden_coding: str = "fp16"
    attention_layers: tuple[int, ...] = ()
    attention_kinds: tuple[str, ...] = ()  # subset of ("t2v", "full")
    attention_coding: str = "fp16"

    def __post_init__(self) -> None:
        from .codecs import HIDDEN_CODINGS, VALUE_CODINGS

        if self.logits not in ("topk", "sampled"):
            raise ValueError(f"signals.logits must be 'topk' or 'sampled', got {self.logits!r}")
        if self.top_k < 1:
            raise ValueError(f"signals.top_k must be >= 1, got {self.top_k}")
        if self.value_coding not in VALUE_CODINGS:
            raise ValueError(f"signals.value_coding {self.value_coding!r} not in {VALUE_CODINGS}")
        if self.logits == "sampled" and self.value_coding == "u8":
            raise ValueError("signals.value_coding 'u8' applies to top-k caches only")
        for name in ("hidden_coding", "attention_coding"):
            if getattr(self, name) not in HIDDEN_CODINGS:
                raise ValueError(f"signals.{name} {getattr(self, name)!r} not in {HIDDEN_CODINGS}")
        if self.attention_layers and not self.attention_kinds:
            raise ValueError("signals.attention_kinds must name 't2v' and/or 'full' when attention_layers are set")
        if any(kind not in ("t2v", "full") for kind in self.attention_kinds):
            raise ValueError(f"signals.attention_kinds {self.attention_kinds} must be drawn from ('t2v', 'full')")
        object.__setattr__(self, "hidden_layers", tuple(int(x) for x in self.hidden_layers))
        object.__setattr__(self, "attention_layers", tuple(int(x) for x in self.attention_layers))
        object.__setattr__(self, "attention_kinds", tuple(self.attention_kinds) if self.attention_layers else ())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SignalConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown signal config fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class FileEntry:
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard: its directory, counts and the checksum of every file in it."""

    shard: int
    path: str
    samples: int
    tokens: int
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "path": self.path,
            "samples": self.samples,
            "tokens": self.tokens,
            "files": {k: asdict(v) for k, v in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardEntry":
        files = {safe_relpath(k): FileEntry(int(v["size"]), str(v["xxh3_128"])) for k, v in d["files"].items()}
        return cls(int(d["shard"]), safe_relpath(d["path"]), int(d["samples"]), int(d["tokens"]), files)


def check_parent_name(name: Any, where: str) -> str:
    """A parent cache's name: one path component under the child's own root, never ``..``, an
    absolute path or a URL (so a manifest cannot make a reader open anything outside the root)."""
    if not isinstance(name, str) or not PARENT_NAME.match(name):
        raise CachePathError(f"{where}: parent {name!r} is not a cache name under the same root "
                             "(one path component of [A-Za-z0-9._-]; no '/', '..', absolute paths or URLs)")
    return name


@dataclass(frozen=True)
class ParentRef:
    """The cache a child cache grows (SPEC.md section 11): the child serves its own samples plus
    the parent's (its whole chain's), minus the ``dropped`` ones; the child wins for an id in both."""

    name: str  # directory name of the parent under the same root
    key: str  # the parent's key, checked when it is opened
    samples: int  # samples the child serves from the parent chain
    tokens: int  # their answer tokens
    dropped: FileEntry | None = None  # dropped.parquet: parent-chain ids the child does not serve
    dropped_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        dropped = None if self.dropped is None else {"path": DROPPED_FILE, **asdict(self.dropped),
                                                     "samples": self.dropped_samples}
        return {"name": self.name, "key": self.key, "samples": self.samples, "tokens": self.tokens, "dropped": dropped}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "ParentRef":
        name = check_parent_name(d.get("name"), where)
        key = str(d["key"])
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise CacheCorruptError(f"{where}: parent key {key!r} is not 64 lowercase hex digits")
        dropped, n_dropped = d.get("dropped"), 0
        if dropped is not None:
            if dropped.get("path") != DROPPED_FILE:
                raise CacheCorruptError(f"{where}: parent.dropped.path must be {DROPPED_FILE!r}")
            n_dropped = int(dropped["samples"])
            dropped = FileEntry(int(dropped["size"]), str(dropped["xxh3_128"]))
        return cls(name, key, int(d["samples"]), int(d["tokens"]), dropped, n_dropped)


@dataclass
class Manifest:
    key: str
    key_inputs: dict[str, Any]
    signals: SignalConfig
    teacher: dict[str, Any]
    samples: int
    tokens: int
    shards: list[ShardEntry]
    index: FileEntry
    created: str
    kd_version: str
    sealed: bool = True
    schema_version: int = SCHEMA_VERSION
    parent: ParentRef | None = None  # schema_version >= 4: the cache this one grows, if any

    def to_json(self) -> bytes:
        d = {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "sealed": self.sealed,
            "key": self.key,
            "created": self.created,
            "kd_version": self.kd_version,
            "teacher": self.teacher,
            "signals": self.signals.to_dict(),
            "counts": {"samples": self.samples, "tokens": self.tokens, "shards": len(self.shards)},
            "index": {"path": INDEX_FILE, **asdict(self.index)},
            "shards": [s.to_dict() for s in self.shards],
            "key_inputs": self.key_inputs,
        }
        if self.schema_version >= PARENT_VERSION:
            d["parent"] = None if self.parent is None else self.parent.to_dict()
        return (json.dumps(d, indent=1, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheCorruptError(f"{where}: manifest is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CacheCorruptError(f"{where}: not a kd cache manifest (format != {FORMAT_NAME!r})")
        check_schema_version(d.get("schema_version"), where)
        version = d["schema_version"]
        try:
            shards = [ShardEntry.from_dict(s) for s in d["shards"]]
            m = cls(
                key=str(d["key"]),
                key_inputs=d["key_inputs"],
                signals=SignalConfig.from_dict(d["signals"]),
                teacher=d["teacher"],
                samples=int(d["counts"]["samples"]),
                tokens=int(d["counts"]["tokens"]),
                shards=shards,
                index=FileEntry(int(d["index"]["size"]), str(d["index"]["xxh3_128"])),
                created=str(d["created"]),
                kd_version=str(d["kd_version"]),
                sealed=bool(d["sealed"]),
                schema_version=int(version),
                parent=(ParentRef.from_dict(d["parent"], where)
                        if version >= PARENT_VERSION and d.get("parent") is not None else None),
            )
        except CachePathError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CacheCorruptError(f"{where}: manifest field missing or malformed: {e!r}") from None
        if d["index"].get("path") != INDEX_FILE:
            raise CacheCorruptError(f"{where}: index path must be {INDEX_FILE!r}")
        if sum(s.samples for s in shards) != m.samples or sum(s.tokens for s in shards) != m.tokens:
            raise CacheCorruptError(f"{where}: manifest counts disagree with the sum over its shards")
        if [s.shard for s in shards] != list(range(len(shards))):
            raise CacheCorruptError(f"{where}: shard numbers must be 0..{len(shards) - 1} in order")
        return m
