"""kd's public torch API: read teacher caches into your own training loop.

Import from here (``from kd.api import ...``), not from ``kd.pipeline.*``: the pipeline's modules
are internal and move; the names below are what kd keeps stable for custom loops and other
trainers (``kd.integrations.transformers`` is built on exactly these).

The pieces, in the order a loop uses them:

``load_records(jsonl)``
    the stage-one dataset (validated records).
``load_student(model_dir)``
    a transformers student and its processor (a tokenizer for a text-only student).
``open_teachers({role: cache url}, vocab_maps, student_tokenizer)``
    opens each teacher's cache (``TeacherSource``: reader, signals, optional vocabulary map).
``DistillDataset(records, processor, teachers)``
    encodes each record for the student and joins it with every cache by sample id; alignment
    is proved before the first batch (``AlignmentError`` names the sample and cache), exactly as
    ``kd distill`` does. Give it to a ``torch.utils.data.DataLoader`` with ``collate_fn=collate``:
    each teacher's signals are then read for a whole batch at once.
``collate(samples, pad_id)``
    right-padded student inputs plus every teacher's targets, flattened over answer tokens.
``build_objective(LossConfig(...), teachers, student)`` -> ``DistillObjective``
    an ``nn.Module`` holding the hidden-state projectors (train them with the student) and
    computing CE + per-teacher KD / hidden / attention terms with capability mixing.
``student_forward(student, batch, hidden_layers=..., attention_layers=...)``
    the teacher-forced forward at the answer positions the caches were captured at.
``objective(outputs, batch)`` -> ``LossBreakdown``
    ``.total(objective.fixed_weights())`` is the loss ``kd distill`` trains on (fixed weights);
    ``.terms`` the detached parts to log.

``DistillModule(student, objective)`` bundles the last three into one module (what ``kd distill``
hands to DDP, so the student and the projectors are synchronised together).
"""

from __future__ import annotations

from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill import (
    AlignmentError,
    DistillDataset,
    DistillObjective,
    LossBreakdown,
    LossConfig,
    VocabMap,
    open_teachers,
)
from kd.pipeline.distill.data import TeacherSource, collate
from kd.pipeline.distill.objective import build_objective
from kd.pipeline.distill.student import StudentOutputs, load_student, student_forward
from kd.pipeline.distill.train import DistillModule

__all__ = [
    "AlignmentError", "DistillDataset", "DistillModule", "DistillObjective", "LossBreakdown", "LossConfig",
    "StudentOutputs", "TeacherSource", "VocabMap", "build_objective", "collate", "load_records", "load_student",
    "open_teachers", "student_forward",
]
