"""Deterministic fault injection for crash tests: ``KD_FAULT_POINT=<name>:<n>[:<action>]``.

Random wall-clock kills rarely land in short phases (a seal takes milliseconds), so the
writer and the build call ``fault_point(name)`` at named points. When the variable names
that point, its ``n``-th hit in this process either SIGKILLs the process (default action
``kill``: no cleanup, no ``finally``, like a power cut) or raises ``OSError(ENOSPC)``
(action ``enospc``: a full disk). Unset, it costs one dict lookup.

Points: ``batch`` (after a teacher batch), ``shard_write`` (after each zarr array of a shard
is written, before its commit), ``after_commit`` (a shard's commit file is published),
``seal_index`` (the seal published ``index.parquet``), ``before_manifest`` (strays removed,
``manifest.json`` not yet written).
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "KD_FAULT_POINT"
POINTS = ("batch", "shard_write", "after_commit", "seal_index", "before_manifest")

_hits: dict[str, int] = {}


def fault_point(name: str, path: str = "") -> None:
    """Count a hit of ``name``; act when ``KD_FAULT_POINT`` asks for this hit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, rest = spec.partition(":")
    if want != name:
        return
    count, _, action = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(count or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or name)
    os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the hit counts (tests run several injected builds in one process)."""
    _hits.clear()
