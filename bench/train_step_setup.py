"""bench/train_step.py's fixed inputs: the three teachers' signals, the rows, and the data, student,
teachers and caches built once under the work directory (``prepare``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


ROLES = ("perception", "reasoning", "planning")
HIDDEN_LAYERS = (2, 4)
# Drive-KD's per-capability attention signals for a 4-layer teacher (losses.default_attention_layers(4)).
ATTENTION = {"perception": ("t2v", (0,)), "reasoning": ("full", (0, 1, 2)), "planning": ("t2v", (2,))}
TEACHER_SEEDS = {"perception": 11, "reasoning": 12, "planning": 13}
ROWS = {"sft": "(a) plain SFT", "cached": "(b) cached KD, 3 teachers", "online": "(c) online KD, 3 teachers"}


def student_preset(name: str):
    from kd.pipeline.demo.tiny_models import STUDENT, TinyPreset

    if name == "student":
        return STUDENT
    return TinyPreset(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=512)


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
        build_preset("vlm", student_preset(args.student), student, seed=5)
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
