"""Stage-two training-step benchmark: plain SFT vs cached multi-teacher KD vs online KD, one student.

    python bench/train_step.py [--steps 30] [--warmup 3] [--batch-size 8] [--scenes 16] [--student student|medium]
                               [--workdir DIR] [--device cpu|cuda] [--threads 1] [--eager-attention]
                               [--set loss.FIELD=VALUE ...] [--profile]

One tiny VLM student (the demo's ``student`` preset, 2 layers x 64; ``--student medium`` is 4 x 256),
synthetic driving data (``kd.pipeline.demo.synth``: 3 records per scene, one per capability) and three
tiny teachers (``teacher`` preset, 4 x 128, different weight seeds, the student's tokenizer) with
Drive-KD's signals per capability: top-k ``--k`` log-probs + hidden states of layers 2 and 4 for
every teacher, plus text-to-vision maps of layer 0 (perception), full maps of layers 0..2
(reasoning) and text-to-vision maps of layer 2 (planning). Rows, same student, data order, batch,
steps and seeds:

(a) plain SFT: answer cross-entropy only, sdpa attention, the student's own encoding of each record.
(b) cached KD: ``kd distill``'s loader (``DistillDataset``: encode + join the three caches by sample
    id, alignment checked) and objective (``DistillObjective``: CE + per teacher top-k KL, hidden
    MSE through projectors, attention-map MSE, mixed by capability), the student's attention maps
    from ``student.MAPS_ATTENTION`` as ``kd distill`` sets it (sdpa in every layer plus the softmax
    weights of the answer rows of the layers whose maps are read); ``--eager-attention`` runs the
    student (and the online teachers) in eager attention instead, as kd distill did before.
    ``--set loss.attention=0`` (any ``LossConfig`` field) prices one signal at a time.
(c) online KD, the way Drive-KD runs: the three teacher models in memory, each step a no-grad
    teacher-forced forward of each on the batch produces the same signals (top-k log-probs + tail,
    hidden states, head-averaged attention maps at the answer positions, exactly as the hf engine
    caches them) for the same ``DistillObjective``. Teachers read the student's batch (shared tokenizer).

A step is what ``kd distill`` times: fetch the batch (``DataLoader``, ``num_workers`` as given),
forward, losses, backward, grad clip, AdamW step.

Time: the three rows run in one process, interleaved step by step (step ``i`` of a, b and c, in a
rotating order, then step ``i + 1``; each row keeps its own student copy, optimiser and loader), so
a burst of load on a shared machine hits every row alike. The table shows each row's median over
``--steps`` steps after ``--warmup``; the ratios are the medians of the per-step ratios.
Memory: each row alone in a fresh subprocess, from its set-up (student, optimiser, loader,
caches, teachers) through ``--warmup`` + ``--memory-steps`` steps, two numbers:
``tensors``, the peak of live torch tensors over those live before the row (``tensor_memory.py``:
exact, from the profiler's allocation events on CPU; ``torch.cuda.max_memory_allocated`` with
``--device cuda``): the model, optimiser state, activations and the batch (copied, as a GPU run
copies it; on CPU the loader's batch is mostly numpy memory), what a GPU holds;
and ``RSS+``, the growth of peak RSS (``VmHWM``, reset at the baseline) over the RSS after every import and the first
use of every library, the same warm-up for all rows (``_warm_up_framework``: parquet, a scratch
kd cache, the processor, and every loss kernel kd distill uses, whose code libtorch pages in on
first call), median of ``--memory-repeats`` runs. The loader row iterates (b)'s data loader alone
(no model) and reports its input tokens/s. Targets (issue #5): (b)/(a) <= 1.15 in time and <= 1.1
in memory. ``--profile`` adds a cProfile of (b)'s timed steps.

What to expect on CPU (shared 2-core machine): (b) costs a roughly fixed ~5-6 ms per step over (a),
so the time ratio shrinks as the student grows: demo student (2 x 64, ~46-49 ms/step as the
machine's load varies) 1.12-1.13x, ``--student medium`` (4 x 256) 1.07x. Priced one signal at a
time (``--set loss.<signal>=0``, 40 interleaved steps): ~1.3 ms the loader's (one
``CacheReader.get_batch`` per teacher, batch-wide alignment checks, the targets' collation; it was
~2.2 ms with a read per sample and teacher), ~2.5 ms the attention maps (the answer rows' softmax
weights and their loss), ~2.4 ms the hidden states (six projections, forward and backward, and
the projectors' share of grad clipping and AdamW), ~1.4 ms the top-k KD terms.
Memory, demo student: tensors (a) +13.97 MiB, (b) +15.25 MiB = 1.091x: the six hidden-state
projectors and their AdamW state (0.57 MiB), the batch's teacher targets and the KD graph at the
step's peak (~0.7 MiB; the KD terms add no [N, V] tensor, see ``bench/kd_loss.py``). RSS+ (a)
+28.1-28.4 MiB, (b) +30.5-31.0 MiB = 1.081-1.098x over six runs: the tensors, plus ~1.3 MiB that does not grow
with the student: three readers (~0.75 MiB: the decoded-chunk LRU, 0.35 MiB here, their indexes
and Python objects) and heap fragmentation from the loader's reads (medium student: 1.08x).
Library set-up is not counted, for any row: libtorch's kernel code paged in on first use
(before the warm-up ran the loss kernels it read 1.14x), blosc's zstd decoder and pyarrow's
readers paged in by the first real cache read (~0.3 MiB; the scratch cache was once too small
for blosc to compress: 1.100-1.106x), pyarrow's mimalloc pool keeping the pages of an index
read's freed buffers (0.7 MiB per cache opened; the reader now hands them back: 1.19x -> 1.14x),
and free heap left by the set-up, handed back before the baseline (``_trim_heap``) so that no
row fills it for free. RSS also moved by ~10 MiB between fresh processes until the workers fixed
glibc's malloc thresholds (``_worker_env``), and the first run after a fresh set-up read (a) and
(b) ~14 MiB higher (ratio 1.00x) until the peak count was restarted at the baseline
(``_reset_peak_rss``): a transient peak from before the baseline had been counted. RSS counts
the library files' pages a row touches, and how many the kernel maps per touch depends on its
page cache: in a just-installed venv (``make test`` on a fresh clone) every row read ~11 MiB
higher, all of it file-backed (``RssFile``; anonymous memory was identical): (a) +39.4, (b)
+42.8 MiB = 1.085x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tensor_memory import peak_tensor_mib  # noqa: E402  (bench/, the script's own folder)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TIME_TARGET, MEMORY_TARGET = 1.15, 1.10
ROLES = ("perception", "reasoning", "planning")
HIDDEN_LAYERS = (2, 4)
# Drive-KD's per-capability attention signals for a 4-layer teacher (losses.default_attention_layers(4)).
ATTENTION = {"perception": ("t2v", (0,)), "reasoning": ("full", (0, 1, 2)), "planning": ("t2v", (2,))}
TEACHER_SEEDS = {"perception": 11, "reasoning": 12, "planning": 13}
ROWS = {"sft": "(a) plain SFT", "cached": "(b) cached KD, 3 teachers", "online": "(c) online KD, 3 teachers"}


def _student_preset(name: str):
    from kd.pipeline.demo.tiny_models import STUDENT, TinyPreset

    if name == "student":
        return STUDENT
    return TinyPreset(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=512)


# ------------------------------------------------------------------------------------------ setup


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    """Data, student, teachers and their caches under ``workdir``; reused when already there."""
    from kd.pipeline.build import BuildRequest, build_cache
    from kd.pipeline.demo.synth import synthesize
    from kd.pipeline.demo.tiny_models import build_preset

    setup_file = workdir / f"setup-{args.scenes}-{args.student}-k{args.k}.json"
    if setup_file.exists():
        setup = json.loads(setup_file.read_text())
        if all(Path(p).exists() for p in setup["caches"].values()):
            return setup
    t0 = time.perf_counter()
    data = synthesize(workdir / f"data-{args.scenes}", args.scenes, seed=0, splits=(1.0, 0.0, 0.0))["train"]
    student = workdir / f"student-{args.student}"
    if not (student / "config.json").exists():
        build_preset("vlm", _student_preset(args.student), student, seed=5)
    caches, teachers = {}, {}
    for role in ROLES:
        teachers[role] = workdir / f"teacher-{role}"
        if not (teachers[role] / "config.json").exists():
            build_preset("vlm", "teacher", teachers[role], seed=TEACHER_SEEDS[role])
        kind, layers = ATTENTION[role]
        caches[role] = build_cache(BuildRequest(
            teacher=str(teachers[role]), data=str(data), out=str(workdir / "caches"), engine="hf", top_k=args.k,
            hidden_layers=HIDDEN_LAYERS, attention_layers=layers, attention_kind=kind, role=role,
            shard_size=64)).path
    setup = {"data": str(data), "student": str(student), "teachers": {r: str(p) for r, p in teachers.items()},
             "caches": caches}
    setup_file.write_text(json.dumps(setup, indent=1))
    print(f"setup: {3 * args.scenes} records, 3 teacher caches built in {time.perf_counter() - t0:.0f} s "
          f"under {workdir}", flush=True)
    return setup


# ----------------------------------------------------------------------------------------- worker


def _rss_mb() -> float:
    """Current resident set size (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), so the baseline holds no
    slack left by the set-up that a row could fill for free (rows with many small allocations,
    like a cache reader's, would profit more than rows of large tensors, which malloc maps apart)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak_rss() -> bool:
    """Restart the peak-RSS count (Linux: ``VmHWM`` after writing 5 to ``/proc/self/clear_refs``), so
    a row's peak is measured from its baseline on, not the set-up's transients before it (those
    once made the first run after a fresh set-up read SFT's RSS+ as 42 MiB instead of 28)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak RSS since the last ``_reset_peak_rss`` (``VmHWM``), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _to_device(obj, device, copy: bool = False):
    """The batch on ``device``; ``copy``: new tensors even on the loader's device (a CPU batch is
    mostly numpy memory that torch's allocator never sees; a GPU run allocates its copy)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=copy)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, copy) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device, copy) for v in obj]
    return obj


class SFTDataset:
    """The student's own encoding of each record, no teacher (plain SFT's data)."""

    def __init__(self, records, processor) -> None:
        self.records, self.processor = list(records), processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        import numpy as np

        from kd.pipeline.distill.data import DistillSample
        from kd.pipeline.common.encoding import encode_record

        rec = self.records[i]
        enc = encode_record(self.processor, rec.as_dict())
        return DistillSample(sample_id=rec.id, capability=rec.capability, input_ids=enc.input_ids.astype(np.int64),
                             answer_start=enc.answer_start, answer_ids=enc.answer_ids.astype(np.int64),
                             image_token_mask=enc.image_token_mask, model_inputs=enc.model_inputs, teachers={})


class OnlineTeacher:
    """A teacher model in memory that produces, for a collated batch, the entry ``collate`` would
    build from its cache: top-k ids / log-probs / tail, hidden states and attention maps, computed
    exactly as ``engines/hf_engine.py`` computes them (answer-predicting positions only)."""

    def __init__(self, model_dir: str, k: int, hidden_layers, attention: tuple[str, tuple[int, ...]], device,
                 maps: bool) -> None:
        from kd.pipeline.distill.student import load_student, use_map_attention

        self.model, _ = load_student(model_dir)
        self.maps = maps and bool(attention[1])
        if self.maps:
            use_map_attention(self.model)  # the same attention-map route as the student's
        elif attention[1]:
            self.model.set_attn_implementation("eager")  # as the hf engine does
        self.model.to(device).eval().requires_grad_(False)
        self.k, self.hidden_layers = k, tuple(hidden_layers)
        self.kind, self.attention_layers = attention

    def targets(self, batch: dict) -> dict:
        import torch

        from kd.pipeline.distill.data import flatten_maps, map_shapes
        from kd.pipeline.build.engines.base import tail_logmass

        device = batch["input_ids"].device
        positions = [torch.arange(int(a) - 1, int(a) - 1 + int(t), device=device)
                     for a, t in zip(batch["answer_start"], batch["num_tokens"])]
        keep = torch.unique(torch.cat(positions))
        rows = [torch.searchsorted(keep, p) for p in positions]
        store, hooks = {}, []
        modules = [self.model.get_decoder().layers[layer].self_attn for layer in self.attention_layers]
        for layer, mod in zip(self.attention_layers, modules):
            def hook(_mod, _inp, output, layer=layer):
                weights = output[1].float().mean(dim=1)
                store[layer] = weights if self.maps else weights[:, keep, :]
            hooks.append(mod.register_forward_hook(hook))
            if self.maps:
                mod._kd_keep = keep
        extra = batch["model_inputs"] or {}
        try:
            # no_grad, not inference_mode: the targets are saved for the student's backward.
            with torch.no_grad():
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=bool(self.hidden_layers), use_cache=False, logits_to_keep=keep,
                                 **extra)
                lp = torch.log_softmax(out.logits.float(), dim=-1)
                lp = torch.cat([lp[b, r] for b, r in enumerate(rows)])
                vals, ids = torch.topk(lp, min(self.k, lp.shape[-1]), dim=-1)
                lengths = batch["lengths"].tolist()
                entry = {
                    "ids": ids, "logprobs": vals, "tail": tail_logmass(vals).to(device),
                    "hidden": {layer: torch.cat([out.hidden_states[layer][b, p] for b, p in enumerate(positions)])
                               for layer in self.hidden_layers},
                    "attention_t2v": {}, "attention_full": {},
                }
                shapes = map_shapes(batch, self.kind)
                for layer in self.attention_layers:
                    maps = [store[layer][b, r, : lengths[b]] for b, r in enumerate(rows)]
                    if self.kind == "t2v":
                        maps = [m[:, batch["image_mask"][b, : lengths[b]]] for b, m in enumerate(maps)]
                    entry[f"attention_{self.kind}"][layer] = flatten_maps(maps, shapes, batch["sample_ids"], "map")
        finally:
            for h in hooks:
                h.remove()
            for mod in modules:
                mod.__dict__.pop("_kd_keep", None)
        return entry


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


def _warm_up_framework(student_dir: str, record, device, scratch: Path) -> float:
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
    before = _rss_mb()
    pq.write_table(pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]}), scratch / "t.parquet", compression="zstd")  # as kd's indexes
    pq.read_table(scratch / "t.parquet")
    _read_scratch_cache(scratch / "cache")
    return _rss_mb() - before


def _loss_config(args: argparse.Namespace):
    """``kd distill``'s default loss config with the ``--set loss.field=value`` overrides."""
    from kd.pipeline.distill.config import LossConfig, apply_overrides

    return LossConfig(**apply_overrides({}, args.set).get("loss", {}))


class RowRunner:
    """One row's training state (its own student copy, optimiser, data loader, teachers) and its step."""

    def __init__(self, row: str, setup: dict, args: argparse.Namespace, records, device) -> None:
        import torch
        from torch.utils.data import DataLoader

        from kd.cache_schema import SignalConfig
        from kd.pipeline.distill.data import (
            DistillDataset,
            EpochSampler,
            collate,
            open_teachers,
        )
        from kd.pipeline.distill.objective import (
            DistillObjective,
            build_objective,
            plan_teacher,
        )
        from kd.pipeline.distill.student import (
            load_student,
            student_dims,
            use_map_attention,
        )
        from kd.pipeline.distill.train import DistillModule, make_adamw

        self.row, self.device = row, device
        self.copy_batch = False  # True when measuring tensors: count the batch as a GPU run would
        self.cuda = device.type == "cuda"
        torch.manual_seed(0)
        student, processor = load_student(setup["student"])
        tok = getattr(processor, "tokenizer", processor)
        self.teachers: dict[str, OnlineTeacher] = {}
        objective = None
        if row in ("cached", "loader"):
            sources = open_teachers(setup["caches"], {}, processor)
            dataset = DistillDataset(records, processor, sources)
            objective = build_objective(_loss_config(args), sources, student)
        else:
            dataset = SFTDataset(records, processor)
        if row == "online":
            n_layers, width = student_dims(student)
            plans = {}
            for role in ROLES:
                kind, layers = ATTENTION[role]
                self.teachers[role] = OnlineTeacher(setup["teachers"][role], args.k, HIDDEN_LAYERS, (kind, layers),
                                                    device, not args.eager_attention)
                t_layers, t_width = student_dims(self.teachers[role].model)
                signals = SignalConfig(logits="topk", top_k=args.k, hidden_layers=HIDDEN_LAYERS,
                                       attention_layers=layers, attention_kinds=(kind,))
                plans[role] = plan_teacher(role, signals, _loss_config(args), student_layers=n_layers,
                                           teacher_width=t_width, teacher_depth=t_layers)
            objective = DistillObjective(_loss_config(args), plans, student_width=width)
        self.sampler = EpochSampler(len(dataset), seed=0)
        self.loader = DataLoader(dataset, batch_size=args.batch_size, sampler=self.sampler,
                                 num_workers=args.num_workers, collate_fn=partial(collate, pad_id=tok.pad_token_id or 0),
                                 persistent_workers=args.num_workers > 0)
        self.data = self._batches()
        if row == "loader":
            return
        if objective is not None and objective.attention_layers:
            if args.eager_attention:
                student.set_attn_implementation("eager")  # every layer's weights materialised
            else:
                use_map_attention(student)  # as kd distill does
        self.student, self.objective = student, objective
        self.module = DistillModule(student, objective) if objective is not None else student
        self.module.to(device).train()
        groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
        if objective is not None and list(objective.parameters()):
            groups.append({"params": list(objective.parameters())})
        self.optimizer = make_adamw(groups, lr=1e-4)  # kd distill's, in every row
        self.weights = objective.fixed_weights() if objective is not None else None

    def _batches(self):
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def step(self) -> dict:
        """One training step: fetch, (teachers,) forward, losses, backward, clip, AdamW. Returns its timings."""
        import torch

        from kd.pipeline.distill.data import attention_layout
        from kd.pipeline.distill.student import student_forward
        from kd.pipeline.distill.losses import answer_ce_loss

        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        batch = _to_device(next(self.data), self.device, copy=self.copy_batch)
        t1 = time.perf_counter()
        if self.teachers:
            batch["teachers"] = {role: t.targets(batch) for role, t in self.teachers.items()}
            kinds = {t.kind for t in self.teachers.values() if t.attention_layers}
            batch["attention_layout"] = {kind: attention_layout(batch, kind) for kind in kinds}
        t2 = time.perf_counter()
        if self.objective is None:
            loss = answer_ce_loss(student_forward(self.student, batch).logits, batch["targets"])
        else:
            loss = self.module(batch).total(self.weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t3 = time.perf_counter()
        return {"step_s": t3 - t0, "data_s": t1 - t0, "teachers_s": t2 - t1, "tokens": int(batch["lengths"].sum())}


def _import_everything() -> None:
    """Every module any row uses, imported before the memory baseline (the same for all rows)."""
    import numpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import zarr  # noqa: F401

    import kd.cache_schema
    import kd.pipeline.distill.train
    import kd.pipeline.build.engines.base  # noqa: F401


def worker(mode: str, setup: dict, args: argparse.Namespace) -> dict:
    """``time``: all rows interleaved step by step in this process (a load burst on the shared machine
    hits every row alike; each row keeps its own state). ``mem-<row>``: one row alone in this fresh
    process, for its peak RSS (and on CUDA its peak allocation). ``tensors-<row>``: the same under
    the profiler, for its peak of live CPU tensors. ``loader``: (b)'s data loader alone."""
    _import_everything()
    import torch

    from kd.pipeline.common.dataset import load_records

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = load_records(setup["data"])
    with tempfile.TemporaryDirectory() as scratch:
        lib_init = _warm_up_framework(setup["student"], records[0], device, Path(scratch))
    _trim_heap()
    base_rss = _rss_mb()
    peak_reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)

    if mode == "loader":
        runner = RowRunner("loader", setup, args, records, device)
        next(runner.data)  # first batch: worker start-up and first reads
        n = args.warmup + args.steps
        t0, tokens, answer_tokens = time.perf_counter(), 0, 0
        for _ in range(n):
            batch = next(runner.data)
            tokens += int(batch["lengths"].sum())
            answer_tokens += int(batch["num_tokens"].sum())
        seconds = time.perf_counter() - t0
        return {"tokens_per_s": tokens / seconds, "answer_tokens_per_s": answer_tokens / seconds}

    if mode.startswith("tensors-"):
        def run() -> None:
            runner = RowRunner(mode[8:], setup, args, records, device)
            runner.copy_batch = True
            for _ in range(args.warmup + args.memory_steps):
                runner.step()

        return {"tensor_mb": peak_tensor_mib(run)}

    if mode.startswith("mem-"):
        runner = RowRunner(mode[4:], setup, args, records, device)
        steps = [runner.step() for _ in range(args.warmup + args.memory_steps)]
        result = {"rss_base_mb": base_rss, "lib_init_mb": lib_init, "rss_peak_mb": _peak_rss_mb(), "peak_reset": peak_reset,
                  "rss_mb": _peak_rss_mb() - base_rss,
                  "step_s": statistics.median(s["step_s"] for s in steps[args.warmup:])}
        if device.type == "cuda":
            result["tensor_mb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
        return result

    runners = {row: RowRunner(row, setup, args, records, device) for row in ROWS}
    for _ in range(args.warmup):
        for runner in runners.values():
            runner.step()
    timings: dict[str, list[dict]] = {row: [] for row in ROWS}
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    order = list(ROWS)
    for i in range(args.steps):
        for row in order[i % 3:] + order[: i % 3]:  # rotate who goes first
            if profiler is not None and row == "cached":
                profiler.enable()
            timings[row].append(runners[row].step())
            if profiler is not None and row == "cached":
                profiler.disable()
    result = {"steps": timings}
    if profiler is not None:
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        result["profile"] = buf.getvalue()
    return result


def _worker_env() -> dict[str, str]:
    """The environment of the worker processes, with glibc's malloc thresholds fixed.

    glibc adapts its mmap threshold as a process frees large blocks, so how much freed memory
    stays resident, and so peak RSS, varied by ~10 MiB from one fresh process to the next (SFT's
    growth read 39 or 49 MiB on the same inputs). Fixed thresholds make it repeat within ~0.3 MiB;
    every row gets the same setting (set them yourself to override).
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    return env


def run_worker(mode: str, setup_path: Path, args: argparse.Namespace) -> dict:
    """``mode`` in a fresh interpreter (its own peak memory); returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", mode, "--setup", str(setup_path), "--result", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--memory-steps", str(args.memory_steps),
           "--batch-size", str(args.batch_size), "--k", str(args.k), "--threads", str(args.threads),
           "--device", args.device, "--num-workers", str(args.num_workers)] + (["--profile"] if args.profile else [])
    cmd += [f"--set={o}" for o in args.set] + (["--eager-attention"] if args.eager_attention else [])
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_worker_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- main


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory-steps", type=int, default=6, help="steps of each memory run (after --warmup)")
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh-process memory runs per row (median)")
    ap.add_argument("--batch-size", type=int, default=8, help="records per step")
    ap.add_argument("--scenes", type=int, default=16, help="synthetic scenes (3 records each)")
    ap.add_argument("--student", choices=("student", "medium"), default="student",
                    help="student size: the demo's (2 x 64) or 4 x 256")
    ap.add_argument("--k", type=int, default=64, help="top-k log-probs per answer token")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings when shared)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (kd distill's default: 0)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--workdir", default=None, help="keep data, models and caches here and reuse them")
    ap.add_argument("--set", action="append", default=[], metavar="loss.FIELD=VALUE",
                    help="loss config override for (b) and (c), e.g. loss.attention=0 (repeatable)")
    ap.add_argument("--eager-attention", action="store_true",
                    help="attention maps from eager attention instead of kd's sdpa+maps attention (rows b, c)")
    ap.add_argument("--profile", action="store_true", help="cProfile (b)'s timed steps")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = worker(args.worker, json.loads(Path(args.setup).read_text()), args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kd-train-step-")
        workdir = Path(tmp.name)
    try:
        setup = prepare(workdir, args)
        setup_path = workdir / "setup-current.json"
        setup_path.write_text(json.dumps(setup))
        t0 = time.perf_counter()
        timing = run_worker("time", setup_path, args)
        print(f"timing: {args.steps} interleaved steps per row in {time.perf_counter() - t0:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {row: [] for row in ROWS}
        for _ in range(args.memory_repeats):  # RSS growth varies by several MiB from run to run: round-robin
            for row in ROWS:
                runs[row].append(run_worker(f"mem-{row}", setup_path, args))
        memory = {}
        for row, label in ROWS.items():
            values = sorted(r["rss_mb"] for r in runs[row])
            memory[row] = {**runs[row][0], "rss_mb": statistics.median(values),
                           "rss_peak_mb": statistics.median(r["rss_peak_mb"] for r in runs[row])}
            if args.device == "cpu":  # deterministic: one run
                memory[row]["tensor_mb"] = run_worker(f"tensors-{row}", setup_path, args)["tensor_mb"]
            print(f"memory {label}: tensors +{memory[row]['tensor_mb']:.2f} MiB, RSS +{memory[row]['rss_mb']:.1f} MiB "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)})", flush=True)
        loader = run_worker("loader", setup_path, args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report(timing, memory, loader, args)
    return 0


def report(timing: dict, memory: dict[str, dict], loader: dict, args: argparse.Namespace) -> None:
    steps = timing["steps"]

    def med(row: str, key: str) -> float:
        return statistics.median(s[key] for s in steps[row])

    tensors = "peak CUDA allocation" if args.device.startswith("cuda") else "peak of live torch CPU tensors"
    print(f"\nstudent {args.student}, batch {args.batch_size}, top-k {args.k}, {args.threads} thread(s), device "
          f"{args.device}; time: median of {args.steps} interleaved steps after {args.warmup} warm-up")
    print(f"{'row':<28}{'ms/step':>9}{'data ms':>9}{'teach ms':>9}{'tok/s':>8}{'tensors':>9}{'RSS+':>7}{'RSS':>6}")
    for row, label in ROWS.items():
        tps = sum(s["tokens"] for s in steps[row]) / sum(s["step_s"] for s in steps[row])
        print(f"{label:<28}{1000 * med(row, 'step_s'):>9.1f}{1000 * med(row, 'data_s'):>9.1f}"
              f"{1000 * med(row, 'teachers_s'):>9.1f}{tps:>8.0f}{memory[row]['tensor_mb']:>9.2f}"
              f"{memory[row]['rss_mb']:>7.1f}{memory[row]['rss_peak_mb']:>6.0f}")
    lib = statistics.median(m["lib_init_mb"] for m in memory.values())
    print(f"(MiB, each row alone in a fresh process. tensors: {tensors} from the row's set-up to its last step. "
          f"RSS+: peak RSS growth over the baseline after imports and first use of every library (the first "
          f"parquet/zarr use alone took {lib:.0f} MiB), median of {args.memory_repeats} runs. RSS: the process's peak "
          f"over the row, baseline included)")
    if not all(r.get("peak_reset", True) for r in memory.values()):
        print("note: /proc/self/clear_refs unavailable: RSS peaks count from process start, set-up transients included")
    print(f"(b) loader alone (no model): {loader['tokens_per_s']:,.0f} input tokens/s, "
          f"{loader['answer_tokens_per_s']:,.0f} answer tokens/s\n")
    for row, tag, target_t, target_m in (("cached", "b", TIME_TARGET, MEMORY_TARGET), ("online", "c", None, None)):
        # Ratio of the same step index (both rows ran within a fraction of a second of each other).
        t = statistics.median(x["step_s"] / a["step_s"] for x, a in zip(steps[row], steps["sft"]))
        line = f"({tag})/(a) time {t:.3f}x" + (f" [{_verdict(t, target_t)} <= {target_t}]" if target_t else "")
        for key, what in (("tensor_mb", "memory (tensors)"), ("rss_mb", "memory (RSS+)")):
            m = memory[row][key] / max(memory["sft"][key], 1e-9)
            line += f"   {what} {m:.3f}x" + (f" [{_verdict(m, target_m)} <= {target_m}]" if target_m else "")
        print(line)
    if "profile" in timing:
        print("\ncProfile of (b)'s timed steps:\n" + timing["profile"])


if __name__ == "__main__":
    sys.exit(main())
