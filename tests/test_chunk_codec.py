"""kd's direct chunk decoder (kd/cache_schema/chunk_codec.py) against zarr, and its refusals."""

from __future__ import annotations

import json

import google_crc32c
import numpy as np
import pytest
import zarr
from cache_helpers import build_cache, make_signals, rewrite_shard_array, shard_dir, write_zarr_group
from large_vocab import large_vocab_samples

from kd.cache_schema import CacheCorruptError, CacheReader, SignalConfig
from kd.cache_schema.chunk_codec import decode_chunk, parse_array_meta
from kd.cache_schema.zarr_io import array_codecs, shuffle_candidates


@pytest.fixture
def cache(tmp_path):
    sig = SignalConfig(top_k=8, value_coding="u8", hidden_layers=(1,), hidden_coding="bf16",
                       attention_layers=(0,), attention_kinds=("t2v", "full"))
    samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([700, 3, 40])]
    return build_cache(str(tmp_path), samples, sig, shard_size=3).location.path, samples


@pytest.fixture(params=["u8", "bf16"])
def large_vocab_cache(tmp_path, request):
    sig = SignalConfig(top_k=64, value_coding=request.param)
    return build_cache(str(tmp_path), large_vocab_samples(sig), sig, shard_size=2).location.path


@pytest.mark.filterwarnings("ignore:Object at index.parquet is not recognized")  # the shard's own index file
def test_every_array_decodes_exactly_as_zarr_reads_it(cache):
    path, _ = cache
    names = _check_every_array(path)
    assert {"ids", "logprobs", "tail_logmass", "hidden_L1", "attn_t2v_L0", "attn_full_L0"} <= set(names)


@pytest.mark.filterwarnings("ignore:Object at index.parquet is not recognized")
def test_large_vocab_arrays_decode_exactly_as_zarr_reads_them(large_vocab_cache):
    """ids_hi, the uint16 ids, bit-shuffled u8 log-prob deltas and the per-array shuffle choices."""
    assert {"ids", "ids_hi", "id_table", "logprobs", "target_ids"} <= set(_check_every_array(large_vocab_cache))


def _check_every_array(path) -> list[str]:
    group = zarr.open_group(str(shard_dir(path)), mode="r")
    names = [name for name, _ in group.arrays()]
    for name in names:
        meta = parse_array_meta(json.loads((shard_dir(path) / name / "zarr.json").read_text()))
        assert meta is not None, name  # kd's own chain is decoded directly
        arr = group[name]
        for c in range(-(-arr.shape[0] // meta.chunk_rows)):
            rows = min(meta.chunk_rows, arr.shape[0] - c * meta.chunk_rows)
            f = shard_dir(path) / name / meta.chunk_key(c)
            got = decode_chunk(f.read_bytes(), meta, rows, str(f)) if f.exists() else meta.fill_chunk(rows)
            want = arr[c * meta.chunk_rows : c * meta.chunk_rows + rows]
            assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), (name, c)
    return names


@pytest.mark.parametrize("name, dtype, shape", [("ids", np.uint16, (5000, 64)), ("logprobs", np.uint8, (5000, 64)),
                                                ("ids_hi", np.uint8, (5000, 1, 16)), ("logprobs", np.float32, (300, 64))])
def test_each_tried_array_gets_the_smallest_candidate_shuffle(name, dtype, shape):
    """The shuffle written to zarr.json is the candidate that compresses the array's first rows
    smallest, whichever it is for the data (bench/cache_io.py measures which wins per coding)."""
    from numcodecs import Blosc

    rng = np.random.default_rng(0)
    data = (np.minimum(rng.geometric(0.3, shape), 200) * (rng.random(shape) < 0.5)).astype(dtype)  # skewed small values
    _, compressors, chunks = array_codecs(name, data)
    blosc = compressors[0]
    row_bytes = data.dtype.itemsize * int(np.prod(shape[1:]))
    sizes = {}
    for shuffle, size in shuffle_candidates(data.dtype.itemsize, row_bytes):
        codec = Blosc(cname="zstd", clevel=1, shuffle={"shuffle": 1, "bitshuffle": 2}[shuffle], blocksize=1 << 20, typesize=size)
        sizes[shuffle, size] = len(codec.encode(np.ascontiguousarray(data[:4096]).view(np.uint8).ravel()))
    assert (blosc.shuffle.value, blosc.typesize) == min(sizes, key=sizes.get)
    assert chunks[1:] == shape[1:] and blosc.clevel == 1


def test_other_codec_chains_are_read_through_zarr(cache):
    path, samples = cache
    group = zarr.open_group(str(shard_dir(path)), mode="r")
    tail = group["tail_logmass"][...]
    rewrite_shard_array(path, "tail_logmass", tail)  # zarr's default codecs, not kd's chain
    assert parse_array_meta(json.loads((shard_dir(path) / "tail_logmass" / "zarr.json").read_text())) is None
    reader = CacheReader(path)
    start = 0
    for s in samples:
        assert np.array_equal(reader.get(s.sample_id).tail_logmass, tail[start : start + s.num_tokens])
        start += s.num_tokens


def test_damaged_chunk_bytes_are_refused_naming_the_file(cache):
    path, _ = cache
    f = shard_dir(path) / "logprobs" / "c" / "0" / "0"
    meta = parse_array_meta(json.loads((shard_dir(path) / "logprobs" / "zarr.json").read_text()))
    raw = f.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    with pytest.raises(CacheCorruptError, match="c/0/0: crc32c mismatch"):
        decode_chunk(bytes(flipped), meta, 10, str(f))
    with pytest.raises(CacheCorruptError, match="too short"):
        decode_chunk(raw[:3], meta, 10, str(f))
    garbage = b"not a blosc frame at all"
    with pytest.raises(CacheCorruptError, match="blosc cannot decompress"):
        decode_chunk(garbage + google_crc32c.value(garbage).to_bytes(4, "little"), meta, 10, str(f))
    other = parse_array_meta(json.loads((shard_dir(path) / "tail_logmass" / "zarr.json").read_text()))
    with pytest.raises(CacheCorruptError, match="decompresses to .* bytes, its shape needs"):
        decode_chunk(raw, other, 10, str(f))  # a valid chunk of another shape


@pytest.mark.parametrize("kind", ["small", "large_vocab_u8", "large_vocab_bf16"])
def test_write_chunks_writes_the_files_zarr_writes(tmp_path, kind):
    """write_chunks (kd's direct chunk writer) against zarr's own writes of every array of a shard:
    the same chunk files, byte for byte (partial last chunks, all-zero chunks left out, 1-3 dims)."""
    from kd.cache_schema.chunk_codec import write_chunks
    from kd.cache_schema.storage import Location
    from kd.cache_schema.topk_coding import encode_topk

    if kind == "small":
        sig = SignalConfig(top_k=8, value_coding="fp16")
        samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([700, 3, 40])]
    else:
        sig = SignalConfig(top_k=64, value_coding=kind.rsplit("_", 1)[1])
        samples = large_vocab_samples(sig, (2500, 1700))
    cat = {f: np.concatenate([getattr(s, f) for s in samples]) for f in ("ids", "logprobs", "tail_logmass", "target_ids")}
    arrays = encode_topk(cat["ids"], cat["logprobs"], cat["tail_logmass"], cat["target_ids"], sig.value_coding)
    arrays["zeros"] = np.zeros((5000, 3), np.float32)  # every chunk the fill value: none written
    arrays["tail_zero"] = np.concatenate([np.ones(300, np.float32), np.zeros(300, np.float32)])
    arrays["empty"] = np.zeros((0, 4), np.uint16)
    kd_root = Location.from_url(str(tmp_path / "kd"))
    trees = {"zarr": write_zarr_group(tmp_path / "zarr", arrays),
             "kd": write_zarr_group(tmp_path / "kd", arrays, write=lambda *args: write_chunks(kd_root, *args))}
    assert trees["kd"].keys() == trees["zarr"].keys() and trees["kd"] == trees["zarr"]
    assert any(k.startswith("tail_zero/c/") for k in trees["kd"]) and not any(k.startswith("zeros/c/") for k in trees["kd"])
