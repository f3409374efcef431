"""How a kd distill run meets its launcher (``accelerate launch`` / ``torchrun``): a CPU launch that
started one process, a resume under another process count, and the process group's end."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist


def warn_single_cpu_launch(accelerator: Any) -> None:
    """``accelerate launch --cpu --num_processes N`` (N > 1) silently runs ONE process: say so and how to fix it."""
    env = os.environ
    if (accelerator.num_processes == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true"
            and "MASTER_ADDR" in env and "WORLD_SIZE" not in env):
        warnings.warn("accelerate launch --cpu with --num_processes > 1 started a single process (accelerate's CPU "
                      "launcher needs mpirun for more); for DDP on CPU use: accelerate launch --multi_gpu "
                      "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no -m kd.cli distill "
                      "...  (gloo backend; no GPU needed)", stacklevel=2)


def check_world_size(ckpt: Path, num_processes: int) -> None:
    """A resume must keep the process count: the saved data position counts per-rank batches."""
    saved = json.loads((ckpt / "trainer_state.json").read_text()).get("num_processes")
    if saved is not None and saved != num_processes:
        raise ValueError(f"cannot resume from {ckpt}: it was written by a run of {saved} process(es), this run has "
                         f"{num_processes} (the data position and global batch depend on it)")


def release_process_group() -> None:
    """Destroy torch.distributed's default process group, if one runs (the end of a launched run).

    A rank that exits with its gloo group alive can abort in the group's C++ teardown ("terminate
    called without an active exception", exit -6), and the launcher then fails a run that finished.
    Not done inside ``distill``: a script may go on using the group after it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
