"""sha256 of large files, remembered by their stat identity so a build does not re-read a teacher's weights.

A cache key holds the content hash of every teacher weight file, so each ``kd cache build`` read all
of them: ~10 s for a 7B teacher's 15 GB, minutes at 70B, even when the build then only finds its
cache sealed or resumes it. As DVC's state database and git's index do, kd remembers a file's hash
against its stat identity: real path, device, inode, size, mtime and ctime in nanoseconds. Any
write to the file moves its ctime, which no user call can set back (``touch`` and ``os.utime`` set
mtime and move ctime to now), so a remembered hash goes stale only if the clock is turned back.

File times have a clock tick's granularity, so a file written again within the tick of its last
write keeps its times (git's "racy" entries). A hash is therefore remembered only for a file whose
last change is ``RACY_SECONDS`` older than the hashing: a just-written checkpoint is hashed each
time until it settles.

Hashes live in the process and, one small file per entry, under ``$KD_CACHE_DIR`` (default
``~/.cache/kd``) ``/file-sha256``; ``KD_HASH_CACHE=0`` keeps them in the process only. A store that
cannot be read or written costs a re-hash, never an error.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

RACY_SECONDS = 2.0
_CHUNK = 1 << 20
_HEX = re.compile(r"[0-9a-f]{64}")
_MEMO: dict[str, str] = {}


def kd_cache_dir() -> Path:
    """kd's own scratch on this machine: ``$KD_CACHE_DIR`` or ``~/.cache/kd``."""
    return Path(os.environ.get("KD_CACHE_DIR") or Path.home() / ".cache" / "kd")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes; read from the file only when its stat identity is new."""
    key, changed_ns = _stat_key(path)
    if key in _MEMO:
        return _MEMO[key]
    entry = _entry_path(key)
    stored = _read_entry(entry) if entry is not None else None
    if stored is not None:
        _MEMO[key] = stored
        return stored
    started_ns = time.time_ns()
    digest = _hash_bytes(path)
    settled = started_ns - changed_ns > RACY_SECONDS * 1e9
    if settled and _stat_key(path)[0] == key:  # unchanged while it was read
        _MEMO[key] = digest
        if entry is not None:
            _write_entry(entry, digest)
    return digest


def _stat_key(path: str | Path) -> tuple[str, int]:
    """(identity string, the later of mtime and ctime in ns) of the file ``path`` resolves to."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = "\0".join(map(str, (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
    return key, max(st.st_mtime_ns, st.st_ctime_ns)


def _hash_bytes(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry_path(key: str) -> Path | None:
    if os.environ.get("KD_HASH_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    return kd_cache_dir() / "file-sha256" / hashlib.sha256(key.encode()).hexdigest()


def _read_entry(entry: Path) -> str | None:
    try:
        text = entry.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _HEX.fullmatch(text) else None  # a torn or foreign file is a miss


def _write_entry(entry: Path, digest: str) -> None:
    """Atomically (temp file + rename), so a concurrent reader sees a whole entry or none."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(digest)
        os.replace(tmp, entry)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
