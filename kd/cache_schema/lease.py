"""The build lease: one ``kd cache build`` driver per cache directory at a time.

Shard commits are safe under any number of writers (fresh attempt dirs, atomic commit
files), but the seal is not: it deletes attempt directories no commit names, which may be
another builder's shard in progress, and it must publish one index and one manifest. So the
driver holds ``<cache>/lease.json`` from plan to seal:

``{"owner": uuid, "host": ..., "pid": ..., "created": t, "heartbeat": t}`` (unix seconds)

* Acquire: exclusive create (local: ``O_CREAT|O_EXCL`` + fsync; other fsspec filesystems:
  ``open(path, "xb")`` where supported, else write then read back; best effort there).
* A background thread rewrites the heartbeat every ``ttl / 3`` seconds, after checking that
  the file still names this owner; if it does not, the lease is *lost* and ``check()`` raises.
* A lease is stale when its heartbeat is older than ``ttl``, or its host is this host and
  its pid is dead (a SIGKILLed builder is taken over at once). A waiter replaces a stale
  lease atomically and reads it back; on a local disk every acquire step runs under
  ``flock`` on the cache directory, so two waiters cannot both take over.
* Release (context exit, also on exceptions) removes the file if this owner still holds it.

Dask workers never take the lease: the driver holds it for the whole build.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import CacheLockedError
from .storage import Location, fsync_dir

if TYPE_CHECKING:
    from typing_extensions import Self

LEASE_FILE = "lease.json"
DEFAULT_TTL = 30.0


@dataclass
class LeaseInfo:
    owner: str
    host: str
    pid: int
    created: float
    heartbeat: float

    @property
    def where(self) -> str:
        return f"{self.host}:{self.pid}"

    def stale(self, ttl: float, now: float | None = None) -> bool:
        """Heartbeat older than ``ttl``, or a dead process on this host."""
        now = time.time() if now is None else now
        if now - self.heartbeat > ttl:
            return True
        return self.host == socket.gethostname() and not pid_alive(self.pid)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        """None for a torn or foreign file (treated as stale once it stays so for a TTL)."""
        try:
            d = json.loads(data)
            return cls(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["created"]), float(d["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BuildLease:
    """Context manager holding the build lease of one cache directory."""

    def __init__(self, location: Location, *, ttl: float = DEFAULT_TTL, wait_timeout: float | None = None,
                 log: Callable[[str], None] = _stderr):
        if ttl <= 0:
            raise ValueError("lease ttl must be > 0")
        self.location = location
        self.ttl = ttl
        self.wait_timeout = wait_timeout
        self.log = log
        now = time.time()
        self.info = LeaseInfo(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self.held = False

    # ------------------------------------------------------------------ public
    def acquire(self) -> Self:
        """Wait until the lease is free or stale, then hold it; CacheLockedError on timeout."""
        self.location.makedirs()
        t0 = time.monotonic()
        last_log = -1e9
        torn_since: float | None = None
        while True:
            with self._mutex():
                if self._create():
                    break
                other = self._read()
                if other is None:  # torn or foreign content: give its writer one TTL
                    torn_since = torn_since or time.monotonic()
                    if time.monotonic() - torn_since > self.ttl and self._take_over():
                        break
                else:
                    torn_since = None
                    if other.owner == self.info.owner or (other.stale(self.ttl) and self._take_over()):
                        break
            waited = time.monotonic() - t0
            who = other.where if other else "unknown (unreadable lease.json)"
            if self.wait_timeout is not None and waited >= self.wait_timeout:
                raise CacheLockedError(f"{self.location.url}/{LEASE_FILE}: builder {who} holds the build lease; "
                                       f"gave up after {waited:.0f}s (stale after {self.ttl:.0f}s without heartbeat)")
            if time.monotonic() - last_log >= 30:
                age = f", heartbeat {time.time() - other.heartbeat:.0f}s ago" if other else ""
                self.log(f"waiting for builder {who} ({self.location.url}/{LEASE_FILE}{age}) ...")
                last_log = time.monotonic()
            time.sleep(min(1.0, self.ttl / 10))
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="kd-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise CacheLockedError if another builder took this lease (e.g. we were paused > TTL)."""
        if not self.held:
            raise CacheLockedError(f"{self.location.url}/{LEASE_FILE}: the build lease is not held")
        if self._lost is None:
            with self._mutex():
                current = self._read()
            if current is None or current.owner != self.info.owner:
                self._lost = f"now held by {current.where}" if current else "lease file gone"
        if self._lost is not None:
            raise CacheLockedError(f"{self.location.url}/{LEASE_FILE}: lost the build lease ({self._lost}); "
                                   "another builder is finishing this cache")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if this owner still holds it."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex():
            current = self._read()
            if current is not None and current.owner == self.info.owner:
                with contextlib.suppress(FileNotFoundError):
                    self.location.fs.rm(self._path)
        self.held = False

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ----------------------------------------------------------------- helpers
    @property
    def _path(self) -> str:
        return self.location.join(LEASE_FILE)

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        """Serialise acquire/take-over/heartbeat steps of every process on a local disk."""
        if not self.location.is_local:
            yield
            return
        import fcntl

        fd = os.open(self.location.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read(self) -> LeaseInfo | None:
        try:
            return LeaseInfo.parse(self.location.fs.cat_file(self._path))
        except FileNotFoundError:
            return None

    def _create(self) -> bool:
        """Exclusive create; False when a lease file already exists."""
        data = self.info.to_bytes()
        if self.location.is_local:
            try:
                fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.location.path)
            return True
        try:
            with self.location.fs.open(self._path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError):  # no exclusive create here: best effort
            if self.location.fs.exists(self._path):
                return False
            self.location.fs.pipe_file(self._path, data)
        return self._owned()

    def _take_over(self) -> bool:
        """Replace a stale lease atomically, then read back that it is ours."""
        now = time.time()
        self.info.created = self.info.heartbeat = now
        self.location.write_atomic(LEASE_FILE, self.info.to_bytes())
        if not self.location.is_local:
            time.sleep(0.2)  # let a racing writer's PUT land before the read-back
        return self._owned()

    def _owned(self) -> bool:
        current = self._read()
        return current is not None and current.owner == self.info.owner

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                with self._mutex():
                    current = self._read()
                    if current is None or current.owner != self.info.owner:
                        self._lost = f"now held by {current.where}" if current else "lease file gone"
                        return
                    self.info.heartbeat = time.time()
                    self.location.write_atomic(LEASE_FILE, self.info.to_bytes())
            except OSError as e:  # a full disk or a flaky store: retry; the lease goes stale after a TTL
                self.log(f"{self.location.url}/{LEASE_FILE}: heartbeat failed ({e}); retrying")
