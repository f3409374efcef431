"""Filesystem access for caches: local paths and any fsspec URL, atomic writes, safe paths.

Every write of a file that readers trust goes through ``write_atomic``: on a local disk a
temp name, fsync and rename; on object stores a single PUT, which is atomic there.

Object-store clients (s3fs, gcsfs, ...) cache directory listings with no expiry, and the
objects here are written by other processes too (dask workers, a concurrent build), so every
look at remote state (``exists``, ``listdir``, ``walk_files``) drops that cache first.
Object stores have no directories: ``makedirs`` is a no-op there and a "directory" exists
while an object lies below its prefix.
"""

from __future__ import annotations

import os
import posixpath
import sys
import uuid
from dataclasses import dataclass

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem

from .errors import CachePathError

CHECKSUM_ALGO = "xxh3_128"


def checksum_bytes(data: bytes) -> str:
    """Fast non-cryptographic checksum used for every file in a cache (integrity, not trust)."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class Location:
    """A directory on some filesystem: ``fs`` plus a path in that filesystem's own syntax."""

    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def from_url(cls, url: str, **storage_options) -> Location:
        fs, path = fsspec.core.url_to_fs(str(url), **storage_options)
        if isinstance(fs, LocalFileSystem):
            path = os.path.abspath(path)
        return cls(fs, path.rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def url(self) -> str:
        """A URL that reopens this location (plain path for local files)."""
        if self.is_local:
            return self.path
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return f"{proto}://{self.path.lstrip('/')}" if proto != "memory" else f"memory://{self.path}"

    def child(self, rel: str) -> Location:
        return Location(self.fs, self.join(rel))

    def join(self, rel: str) -> str:
        """Join a relative path, refusing anything that escapes this directory."""
        return posixpath.join(self.path, safe_relpath(rel))

    def _fresh(self, path: str) -> str:
        """``path``, with any cached listing of it or its parents dropped (see the module docstring)."""
        if not self.is_local:
            self.fs.invalidate_cache(path)
        return path

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._fresh(self.join(rel) if rel else self.path))

    def read_bytes(self, rel: str) -> bytes:
        path = self.join(rel)
        # Any symlinked component (a shard directory, not just the file) could lead outside.
        if self.is_local and os.path.realpath(path) != os.path.join(os.path.realpath(self.path), rel):
            raise CachePathError(f"{path}: symbolic links are not allowed inside a cache")
        return self.fs.cat_file(path)

    def write_atomic(self, rel: str, data: bytes) -> None:
        write_atomic(self.fs, self.join(rel), data)

    def makedirs(self, rel: str = "") -> None:
        target = self.join(rel) if rel else self.path
        if self.is_local:
            os.makedirs(target, exist_ok=True)
        else:
            self.fs.makedirs(target, exist_ok=True)

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        target = self._fresh(self.join(rel) if rel else self.path)
        try:
            entries = self.fs.ls(target, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def walk_files(self, rel: str) -> dict[str, int]:
        """Every file below ``rel`` as {path relative to this location: size}."""
        base = self._fresh(self.join(rel))
        found = self.fs.find(base, detail=True)
        out: dict[str, int] = {}
        root = self.path.rstrip("/") + "/"
        for path, info in found.items():
            norm = path if path.startswith(root) else "/" + path.lstrip("/")
            if not norm.startswith(root):
                raise CachePathError(f"{path}: listed outside {self.path}")
            out[norm[len(root):]] = int(info.get("size") or 0)
        return out

    def remove(self, rel: str, recursive: bool = False) -> None:
        target = self.join(rel)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=recursive)


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure to reach storage (unreachable endpoint, no credentials, denied).

    fsspec maps most object-store errors to ``OSError``; botocore's connection and credential
    errors are not, and are recognised only when botocore is already loaded (no import here).
    """
    if isinstance(exc, OSError):
        return True
    botocore = sys.modules.get("botocore.exceptions")
    return botocore is not None and isinstance(exc, botocore.BotoCoreError)


def safe_relpath(rel: str) -> str:
    """Validate a path taken from a manifest or plan: relative, normalised, never escaping."""
    if not isinstance(rel, str) or rel == "":
        raise CachePathError(f"invalid path {rel!r} in cache metadata")
    if rel.startswith(("/", "\\")) or "\\" in rel or ":" in rel.split("/")[0]:
        raise CachePathError(f"absolute path {rel!r} in cache metadata is refused")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CachePathError(f"path {rel!r} in cache metadata escapes or is not normalised")
    return rel


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` so that readers see the old file or the whole new one."""
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fsync_dir(directory)
    else:
        fs.pipe_file(path, data)


def fsync_dir(directory: str) -> None:
    """Make a rename durable (POSIX needs the directory entry flushed too)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
