"""ShardWriter.commit writes its arrays' chunk files itself (chunk_codec.write_chunks, off zarr's
event loop): every file of a committed shard must be byte for byte what zarr's own writes make,
for every signal a cache holds (top-k at each value coding, sampled counts, hidden states at each
coding, both attention maps) and at a real vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_helpers import file_tree, inputs_for, make_signals, write_zarr_group
from large_vocab import large_vocab_samples

from kd.cache_schema import BuildPlan, CacheBuild, Location, SignalConfig

CASES = {
    "fp32-hidden-attention": SignalConfig(top_k=8, value_coding="fp32", hidden_layers=(0, 2), hidden_coding="fp32",
                                          attention_layers=(1,), attention_kinds=("t2v", "full")),
    "fp16-hidden-fp16": SignalConfig(top_k=8, value_coding="fp16", hidden_layers=(1,), hidden_coding="fp16"),
    "bf16-hidden-bf16": SignalConfig(top_k=16, value_coding="bf16", hidden_layers=(1,), hidden_coding="bf16"),
    "u8": SignalConfig(top_k=8, value_coding="u8"),
    "sampled": SignalConfig(logits="sampled", top_k=6, sampled_draws=6, value_coding="fp16"),
    "vocab-151936-u8": SignalConfig(top_k=64, value_coding="u8"),
    "vocab-151936-bf16": SignalConfig(top_k=64, value_coding="bf16"),
}


def commit_one_shard(root: Path, sig: SignalConfig, samples):
    """(the committed shard's files, the arrays it was written from)."""
    build = CacheBuild(Location.from_url(str(root)), inputs_for(sig), {"name": "t"}, sig)
    build.start(BuildPlan.from_ids([s.sample_id for s in samples], len(samples)))
    writer = build.shard_writer(0)
    for s in samples:
        writer.add(s, "cap", "h")
    arrays, _ = writer._assemble()
    return file_tree(Path(build.location.path, writer.commit().path)), arrays


@pytest.mark.parametrize("case", list(CASES))
def test_committed_files_are_the_files_zarr_writes(case, tmp_path):
    sig = CASES[case]
    if case.startswith("vocab-"):
        samples = large_vocab_samples(sig, (2500, 1700))
    else:
        samples = [make_signals(f"s-{i}", n, sig, seed=i) for i, n in enumerate([700, 3, 40, 1])]
    committed, arrays = commit_one_shard(tmp_path / "cache", sig, samples)
    reference = write_zarr_group(tmp_path / "zarr", arrays, {"kd_shard": 0, "kd_signals": sig.to_dict()})
    assert committed.pop("index.parquet")
    assert committed.keys() == reference.keys()
    assert [n for n in committed if committed[n] != reference[n]] == []
    assert any("/c/" in n for n in committed)  # chunk files were written, not only metadata
