"""What every row of bench/train_step.py pays before its memory baseline: every import, and the
first use of each library (processor, kernels, parquet, a scratch kd cache), the same for all rows.
"""

from __future__ import annotations

from pathlib import Path

from train_step_memory import rss_mb


def import_everything() -> None:
    """Every module any row uses, imported before the memory baseline (the same for all rows)."""
    import numpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import zarr  # noqa: F401

    import kd.cache_schema
    import kd.pipeline.distill.train
    import kd.pipeline.build.engines.base  # noqa: F401


def _read_scratch_cache(root: Path) -> None:
    """Write a small cache with kd's writer and read it back with kd's reader.

    A cache's first open pays library set-up that no later cache pays again: pyarrow's mimalloc pool
    reserves ~2 MiB on its first real parquet read, zarr its event loop and codec pipeline, blosc its
    contexts and the code of its zstd decoder. Paying it on a scratch cache in every row leaves in a
    row's memory what its own caches add. The scratch cache is shaped like a real one (32 samples of
    3 capabilities, 256 tokens of teacher-like values) so that every code path of a read runs: with
    one 2-token sample blosc stored the chunks raw, and the first real read paged in ~0.25 MiB of
    blosc/zstd code that was counted in (b).
    """
    import numpy as np

    from kd.cache_schema import BuildPlan, CacheBuild, CacheReader, Location, SignalConfig, key_inputs
    from kd.pipeline.build.signals import TeacherSignals

    rng = np.random.default_rng(0)
    n, t, k, width, keys = 32, 8, 16, 32, 24
    sig = SignalConfig(top_k=k, hidden_layers=(1,), attention_layers=(0,), attention_kinds=("t2v", "full"))

    def sample(i: int) -> TeacherSignals:
        probs = rng.dirichlet(np.full(k + 1, 0.3), size=t) + 1e-9  # top-k and the tail's mass
        maps = rng.dirichlet(np.ones(keys + t), size=t).astype(np.float32)
        input_ids = rng.integers(0, 500, keys + t, dtype=np.int32)
        return TeacherSignals(
            sample_id=f"warm-up-{i}", target_ids=input_ids[keys:].copy(),
            ids=np.argsort(rng.random((t, 500)), axis=1)[:, :k].astype(np.int32),
            logprobs=np.ascontiguousarray(np.sort(np.log(probs[:, :k]), axis=1)[:, ::-1], np.float32),
            tail_logmass=np.log(probs[:, k]).astype(np.float32), input_ids=input_ids, answer_start=keys,
            hidden={1: rng.standard_normal((t, width)).astype(np.float32)},
            attention_t2v={0: maps[:, :keys]}, attention_full={0: maps})

    samples = [sample(i) for i in range(n)]
    inputs = key_inputs(teacher={"name": "warm-up"}, tokenizer_hash="-", template_hash="-",
                        dataset_fingerprint="-", signals=sig)
    build = CacheBuild(Location.from_url(str(root)), inputs, {"name": "warm-up"}, sig)
    build.start(BuildPlan.from_ids([s.sample_id for s in samples], n))
    writer = build.shard_writer(0)
    for i, s in enumerate(samples):
        writer.add(s, ("perception", "reasoning", "planning")[i % 3])
    writer.commit()
    build.seal("bench")
    reader = CacheReader(build.location.url)
    for i in range(0, n, 8):
        reader.get_batch(reader.sample_ids[i : i + 8])


def _kd_loss_kernels(device):
    """A scalar through every loss kd distill computes (CE and top-k KD on shared log-probs, stacked
    hidden MSE, segment attention MSE, capability mixing) on scratch tensors, for the warm-up: the
    first call of each CPU kernel pages its code in from libtorch (~0.1 MiB of file-backed RSS per
    kernel, shared and the same for any model size), which is library set-up, not what a row adds."""
    import torch

    from kd.pipeline.distill.losses import (
        answer_ce_loss,
        segment_attention_map_loss,
        stacked_hidden_state_rows,
        student_log_probs,
        topk_kd_loss,
    )
    from kd.pipeline.distill.mixing import lookup_teacher_weights, mixing_matrix, teacher_weight_rows

    z = torch.randn(6, 10, device=device, requires_grad=True)
    s = student_log_probs(z)
    ids = torch.stack([torch.randperm(10)[:4] for _ in range(12)]).view(2, 6, 4).to(device)
    lp = torch.randn(2, 6, 5, device=device).log_softmax(-1)
    kd = topk_kd_loss(s, ids, lp[..., :4], lp[..., 4], reduction="none", normalized=True)
    hidden = stacked_hidden_state_rows([z[:, :8], z[:, 2:]], [torch.randn(6, 3, device=device)] * 2,
                                       [torch.nn.Linear(8, 3).to(device) for _ in range(2)])
    maps = z.view(1, 2, 3, 10)
    attn = segment_attention_map_loss(maps, torch.rand(8, device=device), torch.arange(8, device=device),
                                      torch.arange(8, device=device) // 4, 2)
    roles = ["a", "b"]
    w = lookup_teacher_weights(["a", "b"], roles, teacher_weight_rows(roles, mixing_matrix(roles, 0.8))).to(device)
    return (answer_ce_loss(s, torch.arange(6, device=device), normalized=True) + (w.T.repeat_interleave(3, 1) * kd).sum()
            + hidden.sum() + attn.sum())


def warm_up_framework(student_dir: str, record, device, scratch: Path) -> float:
    """Pay the one-off costs every row pays (lazy imports of the model code, the processor and its
    image pipeline, the autograd engine, the CPU kernels' first-use buffers) before the memory
    baseline, so that a row's memory is what its models, optimiser, activations and data add.

    The first parquet read in a process costs ~20 MiB of RSS (pyarrow's allocator and libraries),
    whatever the file, and the first kd cache opened a few MiB more (``_read_scratch_cache``); on a
    tiny student that flat cost would swamp everything a cache adds. It is paid here on a scratch
    parquet file and a scratch cache in every row and returned (MiB) so the report can show it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import transformers.models.idefics3.modeling_idefics3
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoProcessor

    from kd.pipeline.common.encoding import encode_record

    encode_record(AutoProcessor.from_pretrained(student_dir), record.as_dict())
    lin = torch.nn.Linear(64, 64).to(device)
    x = torch.randn(2, 4, 8, 64, device=device)
    y = (torch.nn.functional.scaled_dot_product_attention(x, x, x) @ x.transpose(-1, -2)).softmax(-1) @ x
    loss = lin(y.mean(1)).log_softmax(-1).topk(4).values.sum() + _kd_loss_kernels(device)
    loss.backward()
    torch.optim.AdamW(lin.parameters()).step()
    before = rss_mb()
    pq.write_table(pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]}), scratch / "t.parquet", compression="zstd")  # as kd's indexes
    pq.read_table(scratch / "t.parquet")
    _read_scratch_cache(scratch / "cache")
    return rss_mb() - before
