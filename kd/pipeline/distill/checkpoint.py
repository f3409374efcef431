"""Checkpoints of a run: safetensors for weights, JSON for state, nothing that unpickles code.

Layout of ``<run>/checkpoints/step-NNNNNNNN/``::

    model/                       the student: save_pretrained(safe_serialization=True) + processor
    objective.safetensors        hidden-state projectors
    loss_weights.safetensors     learnable loss weights (when used)
    optimizer.pt                 optimizer state (written with torch.save, read with weights_only=True)
    loss_weights_optimizer.pt    (when used)
    rng.safetensors              torch CPU / CUDA generator states, the AGP order generator
    trainer_state.json           step, epoch, batches consumed in the epoch, scheduler state

A checkpoint is written under ``step-N.tmp`` and renamed when complete, so a directory named
``step-N`` is always whole; ``latest_checkpoint`` ignores anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "prune_checkpoints", "checkpoint_dir"]

_STEP = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))
             and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (and stray ``.tmp`` dirs)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)))
    for _, p in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(p)
    for p in root.glob("*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: str | Path, step: int, *, student: nn.Module, processor: Any, objective: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    loss_weights: nn.Module | None = None, loss_weights_optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> Path:
    """Write a complete checkpoint for ``step`` and return its directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.save_pretrained(tmp / "model", safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp / "model")
    save_file(_module_tensors(objective), str(tmp / "objective.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if loss_weights is not None:
        save_file(_module_tensors(loss_weights), str(tmp / "loss_weights.safetensors"))
        torch.save(loss_weights_optimizer.state_dict(), tmp / "loss_weights_optimizer.pt")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    for name, g in (generators or {}).items():
        rng[f"generator_{name}"] = g.get_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=_json_default))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(ckpt: str | Path, *, student: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loss_weights: nn.Module | None = None,
                    loss_weights_optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote into the given live objects; return the trainer state."""
    ckpt = Path(ckpt)
    loaded = type(student).from_pretrained(ckpt / "model", dtype=next(student.parameters()).dtype)
    student.load_state_dict(loaded.state_dict())
    del loaded
    objective.load_state_dict(load_file(str(ckpt / "objective.safetensors")), strict=True)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    if loss_weights is not None:
        loss_weights.load_state_dict(load_file(str(ckpt / "loss_weights.safetensors")))
        loss_weights_optimizer.load_state_dict(
            torch.load(ckpt / "loss_weights_optimizer.pt", map_location="cpu", weights_only=True))
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    for name, g in (generators or {}).items():
        if f"generator_{name}" in rng:
            g.set_state(rng[f"generator_{name}"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    return state


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
