"""Builders for small teacher-output caches used by the cache format tests."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import zarr

from kd.cache_schema import BuildPlan, CacheBuild, Location, Manifest, SignalConfig, checksum_bytes, key_inputs
from kd.cache_schema.synthetic import teacher_like_topk
from kd.cache_schema.zarr_io import array_codecs, zarr_store
from kd.pipeline.build.signals import TeacherSignals

PROMPT = 6  # prompt tokens before the answer in every synthetic sample


def make_signals(
    sample_id: str,
    num_tokens: int,
    sig: SignalConfig,
    *,
    seed: int,
    hidden_dim: int = 8,
    v_keys: int = 5,
    neg_inf_every: int = 3,
) -> TeacherSignals:
    """A valid TeacherSignals for ``sig``: teacher-like top-k, some -inf padding, optional maps."""
    rng = np.random.default_rng(seed)
    k = sig.top_k
    syn = teacher_like_topk(num_tokens, k, vocab=4096, seed=seed)
    ids, lp = syn.ids.copy(), syn.logprobs.copy()
    if k > 1 and neg_inf_every and sig.logits == "topk":
        lp[::neg_inf_every, -1] = -np.inf  # a padded last entry on some rows
    counts = None
    if sig.logits == "sampled":
        n_distinct = rng.integers(1, k + 1, num_tokens)
        pad = np.arange(k)[None, :] >= n_distinct[:, None]
        ids = np.where(pad, -1, ids).astype(np.int32)
        lp = np.where(pad, -np.inf, lp).astype(np.float32)
        counts = np.where(pad, 0, rng.integers(1, 9, (num_tokens, k))).astype(np.uint16)
    target = syn.target_ids
    input_ids = np.concatenate([rng.integers(0, 4096, PROMPT).astype(np.int32), target])
    seq_len = len(input_ids)
    hidden = {layer: rng.normal(0, 3, (num_tokens, hidden_dim)).astype(np.float32) for layer in sig.hidden_layers}
    t2v, full = {}, {}
    if "t2v" in sig.attention_kinds:
        t2v = {layer: rng.dirichlet(np.ones(v_keys), num_tokens).astype(np.float32) for layer in sig.attention_layers}
    if "full" in sig.attention_kinds:
        full = {layer: rng.dirichlet(np.ones(seq_len), num_tokens).astype(np.float32) for layer in sig.attention_layers}
    return TeacherSignals(
        sample_id=sample_id, target_ids=target, ids=ids, logprobs=lp, tail_logmass=syn.tail_logmass,
        input_ids=input_ids, answer_start=PROMPT, counts=counts, hidden=hidden, attention_t2v=t2v, attention_full=full,
    )


def inputs_for(sig: SignalConfig, *, teacher: str = "Org/Teacher-7B", dataset: str = "ds-fp-1") -> dict:
    return key_inputs(teacher={"name": teacher, "revision": "r1"}, tokenizer_hash="tok-1", template_hash="tpl-1",
                      dataset_fingerprint=dataset, signals=sig, engine={"kind": "hf", "dtype": "float32"})


def build_cache(
    root_url: str,
    samples: list[TeacherSignals],
    sig: SignalConfig,
    *,
    shard_size: int = 2,
    teacher: str = "Org/Teacher-7B",
    dataset: str = "ds-fp-1",
    commit_shards: Iterable[int] | None = None,
    seal: bool = True,
) -> CacheBuild:
    """Write ``samples`` as a cache under ``root_url``; optionally only some shards, unsealed."""
    build = CacheBuild(Location.from_url(root_url), inputs_for(sig, teacher=teacher, dataset=dataset),
                       {"name": teacher}, sig)
    plan = BuildPlan.from_ids([s.sample_id for s in samples], shard_size)
    build.start(plan)
    by_id = {s.sample_id: s for s in samples}
    shards = range(len(plan.shards)) if commit_shards is None else commit_shards
    for shard in shards:
        writer = build.shard_writer(shard)
        for sid in plan.shards[shard]:
            writer.add(by_id[sid], f"cap-{int(sid.split('-')[-1]) % 3}")
        writer.commit()
    if seal:
        build.seal("test")
    return build


def read_manifest(cache_dir: str | Path) -> dict:
    return json.loads(Path(cache_dir, "manifest.json").read_text())


def write_manifest(cache_dir: str | Path, doc: dict) -> None:
    Path(cache_dir, "manifest.json").write_text(json.dumps(doc, indent=1))


def shard_dir(cache_dir: str | Path, shard: int = 0) -> Path:
    return Path(cache_dir, read_manifest(cache_dir)["shards"][shard]["path"])


def flip_byte(path: str | Path, offset: int = -10) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def truncate(path: str | Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def chunk_file(cache_dir: str | Path, array: str, shard: int = 0) -> Path:
    """The first chunk file of ``array`` in ``shard``."""
    base = shard_dir(cache_dir, shard) / array / "c"
    for dirpath, _, files in sorted(os.walk(base)):
        if files:
            return Path(dirpath, sorted(files)[0])
    raise FileNotFoundError(f"no chunk under {base}")


def manifest_of(build: CacheBuild) -> Manifest:
    return Manifest.from_json(build.location.read_bytes("manifest.json"), build.location.url)


def rewrite_shard_array(cache: str, name: str, data: np.ndarray | None, drop: str | None = None) -> None:
    """Replace (or drop) arrays of shard 0 with plain zarr, then re-record sizes and checksums."""
    sdir = shard_dir(cache)
    group = zarr.open_group(str(sdir), mode="a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if drop:
            del group[drop]
        if data is not None:
            group.create_array(name, data=data, chunks=(256,) + data.shape[1:], overwrite=True)
    doc = read_manifest(cache)
    files = {}
    for f in sorted(p for p in sdir.rglob("*") if p.is_file()):
        raw = f.read_bytes()
        files[f.relative_to(sdir).as_posix()] = {"size": len(raw), "xxh3_128": checksum_bytes(raw)}
    doc["shards"][0]["files"] = files
    write_manifest(cache, doc)
    commit = Path(cache, "shards", "00000.commit.json")
    entry = json.loads(commit.read_text())
    entry["files"] = files
    commit.write_text(json.dumps(entry))


def same_entries_per_row(got_ids: np.ndarray, got_logprobs: np.ndarray, expected_ids: np.ndarray) -> bool:
    """Row by row, the same (log-prob, id) pairs: ``u8`` caches return the ids of entries with equal
    decoded log-probs (a tie group) in a canonical order, so only the pairs must match."""
    if got_ids.shape != expected_ids.shape:
        return False
    rows = np.broadcast_to(np.arange(got_ids.shape[0])[:, None], got_ids.shape).ravel()
    values = got_logprobs.ravel().view(np.int32)  # bit patterns: -inf sorts alike on both sides

    def pairs(ids: np.ndarray) -> np.ndarray:
        order = np.lexsort((ids.ravel(), values, rows))
        return ids.ravel()[order]

    return bool(np.array_equal(pairs(got_ids), pairs(expected_ids)))


def file_tree(root: str | Path) -> dict[str, bytes]:
    """Every file below ``root`` (its path relative to ``root``) with its bytes: how two writers'
    outputs are compared."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_zarr_group(root: str | Path, arrays: dict[str, np.ndarray], attrs: dict | None = None,
                     write: Callable[[str, np.ndarray, object, tuple], None] | None = None) -> dict[str, bytes]:
    """``arrays`` as one zarr v3 group at ``root`` with kd's codecs (``array_codecs``), each array's data
    written by zarr (``arr[...] = data``) or by ``write(name, data, compressor, chunks)``; its ``file_tree``.
    The reference the chunk-writing tests compare kd's own chunk files against."""
    group = zarr.open_group(store=zarr_store(Location.from_url(str(root))), mode="w", zarr_format=3)
    group.attrs.update(attrs or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, data in arrays.items():
            filters, compressors, chunks = array_codecs(name, data)
            arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, filters=filters,
                                     compressors=compressors)
            if write is not None:
                write(name, data, compressors[0], chunks)
            elif data.size:
                arr[...] = data
    return file_tree(root)
