"""Stage two as one readable recipe: ``distill(config)`` trains a student from cached teacher signals.

setup    load the student, open the caches, prove alignment, build the objective, optimiser and
         schedule; resume from the last checkpoint when asked
train    each step: ``grad_accum`` micro-batches -> losses -> gradients (plain, or per loss and
         combined by AGP) -> clip -> AdamW step -> schedule step; log, evaluate, checkpoint
cleanup  final checkpoint, final student in ``<out>/model``, final evaluation

Runs as a single process on CPU or one GPU, and under ``accelerate launch`` with DDP (NCCL on GPUs,
gloo on CPU). Every rank draws the same seeded permutation (``EpochSampler``); accelerate's prepared
loader hands rank ``r`` of ``N`` the loader batches ``r, r + N, ...``, so each rank reads (and
decodes) only its own samples. One optimiser step therefore consumes ``batch_size * grad_accum *
N`` samples; with ``grad_accum`` divided by ``N`` it sees exactly the micro-batches of the
single-process run, and the averaged DDP gradient equals the single-process one up to float
summation order (losses are token-weighted means per micro-batch, so halving ``batch_size``
instead would reweight tokens slightly). ``metrics.jsonl`` records ``num_processes``, and with
``train.log_samples`` the sample ids each rank trained on per step.

On CPU, ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's "simple"
launcher expects ``mpirun`` for multi-CPU); use its torchrun path instead, which works without GPUs
because ``distill`` asks for a CPU accelerator when CUDA is absent (gloo backend)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 0 -m kd.cli distill ...
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill.launch import check_world_size, warn_single_cpu_launch
from kd.pipeline.distill.evaluate import evaluate_model
from kd.pipeline.distill.mixing import (LearnableLossWeights, agp_combine, assign_grads, check_capabilities, grad_norms,
                                 per_loss_grads)

from .checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import DistillConfig
from .data import DistillDataset, EpochSampler, collate, open_teachers
from .objective import DistillObjective, LossBreakdown, build_objective
from .rundir import MetricsLogger, check_resume_compatible, write_run_files
from .student import load_student, student_forward, use_map_attention

__all__ = ["RunResult", "DistillModule", "distill", "cosine_with_warmup"]


@dataclass
class RunResult:
    """What a run produced. ``steps`` counts optimiser steps done (including resumed ones)."""

    run_dir: Path
    model_dir: Path
    steps: int
    last_checkpoint: Path | None
    resumed_from: int | None
    final_loss: float | None
    eval: dict[str, Any] | None


class DistillModule(nn.Module):
    """Student + objective in one module, so DDP wraps (and syncs) the student and the projectors together."""

    def __init__(self, student: nn.Module, objective: DistillObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, batch: dict[str, Any]) -> LossBreakdown:
        out = student_forward(self.student, batch, hidden_layers=self.objective.hidden_layers,
                              attention_layers=self.objective.attention_layers)
        return self.objective(out, batch)


def cosine_with_warmup(total: int, warmup: int, min_ratio: float = 0.0):
    """LR multiplier for step ``s`` (0-based): linear warmup, then cosine from 1 to ``min_ratio`` at ``total``."""
    import math

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
               weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (CPU and CUDA): one kernel over every tensor instead of a
    Python loop of a few ops per tensor, ~8x faster steps on a small student's ~100 tensors on CPU."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def _precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting


def _batches(loader, sampler: EpochSampler, accelerator: Accelerator, epoch: int, skip: int) -> Iterator[tuple[int, int, Any]]:
    """Endless ``(epoch, index in epoch, batch)``; the first epoch starts after ``skip`` batches."""
    while True:
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        it = accelerator.skip_first_batches(loader, skip) if skip else loader
        for i, batch in enumerate(it, start=skip):
            yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def distill(config: DistillConfig) -> RunResult:
    """Train the student of ``config`` against its teacher caches; see the module docstring."""
    cfg = config.resolved()
    tc, lc = cfg.train, cfg.loss
    run_dir = Path(cfg.out)
    records = load_records(cfg.data)
    # DDP must be told when some batches leave parameters unused: text-only samples skip a VLM's vision tower.
    unused = any(not r.images for r in records) and any(r.images for r in records)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_precision(tc.mixed_precision),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])
    main = accelerator.is_main_process
    warn_single_cpu_launch(accelerator)
    set_seed(tc.seed)

    # ------------------------------------------------------------------ setup
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run (checkpoint {ckpt.name}); pass resume=True or "
                              "choose another out directory")
    student, processor = load_student(cfg.student)
    sources = open_teachers(cfg.teachers, cfg.vocab_maps, processor, cache_bytes=tc.cache_mib << 20)
    dataset = DistillDataset(records, processor, sources, missing=cfg.missing)
    del records  # the dataset holds them as Arrow columns (RecordTable): no list of Records per process
    objective = build_objective(lc, sources, student)
    check_capabilities(dataset.records.capabilities(), objective.roles,  # before any step, not at step 1
                       "uniform" if len(objective.roles) == 1 else lc.unknown_capability, source=str(cfg.data))
    if objective.attention_layers:
        use_map_attention(student)  # sdpa, plus the attention weights of the answer rows of the layers read
    teachers_doc = {role: src.describe() for role, src in sources.items()}
    if cfg.resume and ckpt is not None:
        check_resume_compatible(run_dir, cfg, teachers_doc)
    if main:
        write_run_files(run_dir, cfg, teachers_doc, {r: p.to_dict() for r, p in objective.plans.items()})
    val_records = load_records(cfg.val_data) if cfg.val_data else None

    module = DistillModule(student, objective)
    tok = getattr(processor, "tokenizer", processor)
    sampler = EpochSampler(len(dataset), seed=tc.seed)
    # Workers stay up across epochs: each one opens its own readers (and LRU) when it starts.
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, num_workers=tc.num_workers,
                        collate_fn=partial(collate, pad_id=tok.pad_token_id or 0),
                        persistent_workers=tc.num_workers > 0)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": tc.lr}]
    if list(objective.parameters()):
        groups.append({"params": list(objective.parameters()), "lr": tc.projector_lr or tc.lr})
    optimizer = make_adamw(groups, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    raw = accelerator.unwrap_model(module)
    total_steps = tc.max_steps or max(1, -(-tc.epochs * len(loader) // tc.grad_accum))
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(tc.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                                  cosine_with_warmup(total_steps, warmup, tc.min_lr_ratio))
    loss_weights = lw_opt = None
    if lc.weighting == "learnable":
        loss_weights = LearnableLossWeights(objective.loss_names, ce_floor=lc.ce_floor, alpha=lc.gradnorm_alpha)
        loss_weights.to(accelerator.device)
        lw_opt = torch.optim.Adam(loss_weights.parameters(), lr=lc.weights_lr)
    agp_gen = torch.Generator().manual_seed(tc.seed)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    resumed_from = None
    if cfg.resume and ckpt is not None:
        check_world_size(ckpt, accelerator.num_processes)
        state = load_checkpoint(ckpt, student=raw.student, objective=raw.objective, optimizer=optimizer,
                                scheduler=scheduler, loss_weights=loss_weights, loss_weights_optimizer=lw_opt,
                                generators={"agp": agp_gen})
        resumed_from = state["step"]
    logger = MetricsLogger(run_dir, enabled=main)
    if resumed_from is not None:
        logger.truncate_after(resumed_from)

    # ------------------------------------------------------------------ train
    step, last_ckpt, last_loss, last_eval = state["step"], ckpt if resumed_from is not None else None, None, None
    data = _batches(loader, sampler, accelerator, state["epoch"], state["batch_in_epoch"])
    epoch, index = state["epoch"], state["batch_in_epoch"]
    progress = _progress(quiet=cfg.quiet or not main, total=total_steps, done=step)
    module.train()
    with progress:
        while step < total_steps:
            t0 = time.perf_counter()
            weights = loss_weights.as_dict() if loss_weights is not None else raw.objective.fixed_weights()
            totals, terms, tokens, answer_tokens, ids = [], {}, 0, 0, []
            for micro in range(tc.grad_accum):
                epoch, index, batch = next(data)
                last_micro = micro == tc.grad_accum - 1
                bd, total = _micro_step(accelerator, module, raw, batch, weights, tc.grad_accum, last_micro, lc.agp,
                                        agp_gen if lc.agp_shuffle else None, loss_weights)
                totals.append(float(total))
                for k, v in bd.terms.items():
                    terms[k] = terms.get(k, 0.0) + v / tc.grad_accum
                tokens += int(batch["lengths"].sum())
                ids.extend(batch["sample_ids"])
                answer_tokens += int(batch["num_tokens"].sum())
            if lc.agp and accelerator.num_processes > 1:
                _allreduce_grads(raw, accelerator)
            if tc.max_grad_norm > 0:
                accelerator.clip_grad_norm_(module.parameters(), tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if lw_opt is not None:
                lw_opt.step()
                lw_opt.zero_grad(set_to_none=True)
            step += 1
            state = {"step": step, "epoch": epoch, "batch_in_epoch": index + 1,
                     "num_processes": accelerator.num_processes}
            stats = torch.tensor([sum(totals) / len(totals), tokens, answer_tokens, len(ids)],
                                 device=accelerator.device, dtype=torch.float64)
            stats = accelerator.reduce(stats, "sum")
            last_loss = float(stats[0]) / accelerator.num_processes
            elapsed = time.perf_counter() - t0
            tps = float(stats[1]) / elapsed
            progress.update(step, loss=last_loss, tps=tps)
            if step % tc.log_every == 0 or step == total_steps:
                record = {"step": step, "split": "train", "epoch": epoch, "loss": last_loss,
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps, "tokens": int(stats[1]),
                          "answer_tokens": int(stats[2]), "samples": int(stats[3]),
                          "num_processes": accelerator.num_processes, "step_time_s": elapsed,
                          "terms": _mean_over_ranks(accelerator, terms),
                          "weights": {k: float(v) for k, v in weights.items()}}
                if tc.log_samples:
                    record["sample_ids"] = _gather_lists(accelerator, ids)
                logger.log(record)
            if val_records is not None and tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                last_eval = _evaluate(accelerator, raw.student, processor, val_records, tc, logger, step)
            if tc.save_every and step % tc.save_every == 0 and step < total_steps:
                last_ckpt = _save(accelerator, run_dir, step, raw, processor, optimizer, scheduler, state,
                                  loss_weights, lw_opt, agp_gen, tc.keep_checkpoints)

    # ------------------------------------------------------------------ cleanup
    if last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}"):
        last_ckpt = _save(accelerator, run_dir, step, raw, processor, optimizer, scheduler, state, loss_weights,
                          lw_opt, agp_gen, tc.keep_checkpoints)
    model_dir = run_dir / "model"
    if main:
        raw.student.save_pretrained(model_dir, safe_serialization=True)
        processor.save_pretrained(model_dir)
    if val_records is not None:
        last_eval = _evaluate(accelerator, raw.student, processor, val_records, tc, logger, step)
        if main:
            import json

            (run_dir / "eval.json").write_text(json.dumps({"step": step, **last_eval}, indent=1) + "\n")
    logger.close()
    accelerator.wait_for_everyone()
    return RunResult(run_dir=run_dir, model_dir=model_dir, steps=step, last_checkpoint=last_ckpt,
                     resumed_from=resumed_from, final_loss=last_loss, eval=last_eval)


# ---------------------------------------------------------------------- step pieces


def _micro_step(accelerator: Accelerator, module: nn.Module, raw: DistillModule, batch: dict[str, Any],
                weights: dict[str, float], accum: int, last_micro: bool, agp: bool,
                agp_gen: torch.Generator | None, loss_weights: LearnableLossWeights | None) -> tuple[LossBreakdown, float]:
    """Forward one micro-batch and add its gradients to ``.grad``; returns the breakdown and the weighted loss."""
    if agp:
        # Separate gradients per loss (autograd.grad, outside DDP's hooks; ranks sync in _allreduce_grads).
        params = [p for p in raw.parameters() if p.requires_grad]
        with accelerator.autocast():
            bd = raw(batch)
        weighted = {n: weights[n] * loss / accum for n, loss in bd.losses.items()}
        grads = per_loss_grads(weighted, params)
        if loss_weights is not None:
            norms = {n: g / max(weights[n] / accum, 1e-12) for n, g in grad_norms(grads).items()}
            _gradnorm_backward(accelerator, loss_weights, bd, norms)
        assign_grads(params, agp_combine(grads, "ce", generator=agp_gen))
        return bd, float(bd.total(weights).detach())
    sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(module)
    with sync:
        with accelerator.autocast():
            bd = module(batch)
        total = bd.total(weights)
        if loss_weights is not None:
            shared = [p for p in raw.student.get_decoder().layers[-1].parameters() if p.requires_grad]
            norms = grad_norms(per_loss_grads(bd.losses, shared, retain_graph=True))
            _gradnorm_backward(accelerator, loss_weights, bd, norms)
        accelerator.backward(total / accum)
    return bd, float(total.detach())


def _gradnorm_backward(accelerator: Accelerator, loss_weights: LearnableLossWeights, bd: LossBreakdown,
                       norms: dict[str, torch.Tensor]) -> None:
    """Accumulate the GradNorm objective's gradient into the loss weights (losses and norms synced across ranks)."""
    names = loss_weights.names
    dev = accelerator.device
    vals = torch.stack([bd.losses[n].detach().float().to(dev) for n in names] +
                       [torch.as_tensor(norms[n]).detach().float().to(dev) for n in names])
    vals = accelerator.reduce(vals, "mean")
    k = len(names)
    loss_weights.gradnorm_objective(dict(zip(names, vals[:k])), dict(zip(names, vals[k:]))).backward()


def _mean_over_ranks(accelerator: Accelerator, terms: dict[str, float]) -> dict[str, float]:
    """Average the loss terms of this step over ranks (objects, so ranks may differ in which terms they have)."""
    if accelerator.num_processes == 1:
        return terms
    sums: dict[str, list[float]] = {}
    for rank_terms in _gather_lists(accelerator, terms):
        for k, v in rank_terms.items():
            sums.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _gather_lists(accelerator: Accelerator, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without DDP)."""
    from accelerate.utils import gather_object

    return list(gather_object([obj])) if accelerator.num_processes > 1 else [obj]


def _allreduce_grads(raw: nn.Module, accelerator: Accelerator) -> None:
    for p in raw.parameters():
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, "mean")


def _evaluate(accelerator: Accelerator, student: nn.Module, processor: Any, records, tc, logger: MetricsLogger,
              step: int) -> dict[str, Any] | None:
    result = None
    if accelerator.is_main_process:
        result = evaluate_model(student, processor, records, max_new_tokens=tc.eval_max_new_tokens,
                                batch_size=tc.eval_batch_size, max_samples=tc.eval_max_samples)
        logger.log({"step": step, "split": "val", **result})
    accelerator.wait_for_everyone()
    return result


def _save(accelerator: Accelerator, run_dir: Path, step: int, raw: DistillModule, processor: Any, optimizer,
          scheduler, state: dict[str, Any], loss_weights, lw_opt, agp_gen: torch.Generator, keep: int) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    if accelerator.is_main_process:
        path = save_checkpoint(run_dir, step, student=raw.student, processor=processor, objective=raw.objective,
                               optimizer=optimizer, scheduler=scheduler, trainer_state=state,
                               loss_weights=loss_weights, loss_weights_optimizer=lw_opt, generators={"agp": agp_gen})
        prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return path


class _Progress:
    """A rich progress bar with loss and tokens/s, or nothing (quiet, not a TTY, not rank 0)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self._p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                               TimeRemainingColumn())

    def __enter__(self):
        if self._p is not None:
            self._p.__enter__()
            self._task = self._p.add_task("distill", total=self.total, completed=self.done, loss=float("nan"), tps=0.0)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def update(self, step: int, loss: float, tps: float) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=step, loss=loss, tps=tps)


def _progress(quiet: bool, total: int, done: int) -> _Progress:
    return _Progress(total, done, enabled=not quiet and sys.stdout.isatty())
