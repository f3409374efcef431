"""Remembered file hashes: the bytes are read once per stat identity, and any write is seen."""

import hashlib
import os
import time

import pytest

from kd.pipeline.common import file_hashes


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A fresh on-disk store and in-process memo; files count as settled at once."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))
    monkeypatch.setattr(file_hashes, "_MEMO", {})
    monkeypatch.setattr(file_hashes, "RACY_SECONDS", -1.0)
    reads = []
    real = file_hashes._hash_bytes
    monkeypatch.setattr(file_hashes, "_hash_bytes", lambda p: reads.append(p) or real(p))
    return tmp_path / "kd-cache" / "file-sha256", reads


def _rewrite_keeping_times(path, data: bytes) -> None:
    """Same size, new bytes, mtime set back: only ctime (and the content) tell it changed."""
    st = os.stat(path)
    time.sleep(0.05)  # past the file-time clock tick
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_hash_is_the_contents_sha256_and_is_read_once(tmp_path, store):
    entries, reads = store
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_hashes.sha256_file(f) == want
    assert file_hashes.sha256_file(f) == want
    assert len(reads) == 1
    file_hashes._MEMO.clear()  # a new process: the on-disk entry answers
    assert file_hashes.sha256_file(f) == want and len(reads) == 1
    assert len(list(entries.iterdir())) == 1


def test_a_write_that_keeps_size_and_mtime_is_still_seen(tmp_path, store):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"A" * 4096)
    first = file_hashes.sha256_file(f)
    before = os.stat(f)
    _rewrite_keeping_times(f, b"B" * 4096)
    assert (os.stat(f).st_mtime_ns, os.stat(f).st_size) == (before.st_mtime_ns, before.st_size)
    assert file_hashes.sha256_file(f) == hashlib.sha256(b"B" * 4096).hexdigest() != first


def test_a_just_written_file_is_not_remembered(tmp_path, store, monkeypatch):
    """Within the racy window a second write may keep every stat field: such files are re-read."""
    entries, reads = store
    monkeypatch.setattr(file_hashes, "RACY_SECONDS", 3600.0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"A" * 64)
    file_hashes.sha256_file(f)
    file_hashes.sha256_file(f)
    assert len(reads) == 2 and not entries.exists()


def test_a_torn_store_entry_is_a_miss_and_off_means_memory_only(tmp_path, store, monkeypatch):
    entries, reads = store
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"A" * 64)
    want = file_hashes.sha256_file(f)
    (entry,) = entries.iterdir()
    entry.write_text("not a hash")
    file_hashes._MEMO.clear()
    assert file_hashes.sha256_file(f) == want and len(reads) == 2
    monkeypatch.setenv("KD_HASH_CACHE", "0")
    g = tmp_path / "g.safetensors"
    g.write_bytes(b"G" * 64)
    file_hashes.sha256_file(g)
    assert len(list(entries.iterdir())) == 1  # no entry for g
