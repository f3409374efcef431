"""One sample as the student trains on it: its encoding plus each teacher's targets in student ids
(``TeacherTargets``; unmapped top-k entries fold into the tail), and a batch of them read together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kd.cache_schema import CachedBatch, CachedSample, SampleRows
from kd.cache_schema.turns import single_turn, target_positions
from kd.pipeline.distill.teachers import VocabMap


@dataclass
class TeacherTargets:
    """One teacher's signals in student ids (rows = answer tokens): for one sample, attention maps
    ``[T, K]``; or for a batch read together (``SampleBatch.teachers``), every sample's rows
    concatenated and its attention maps flattened and concatenated as ``flatten_maps`` does."""

    ids: np.ndarray  # [T, k] int64, -1 padding
    logprobs: np.ndarray  # [T, k] float32, -inf padding
    tail: np.ndarray  # [T] float32
    counts: np.ndarray | None = None  # [T, k] float32 (sampled caches)
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    attention_t2v: dict[int, np.ndarray] = field(default_factory=dict)
    attention_full: dict[int, np.ndarray] = field(default_factory=dict)


def to_student_ids(cached: CachedSample | CachedBatch, vmap: VocabMap | None) -> TeacherTargets:
    """The cached logit signal in student ids; unmapped top-k entries fold into the tail (row by
    row, so a batch read together converts at once).

    For a sampled cache, unmapped draws are dropped (their counts set to 0), so the estimate
    covers the mapped part of the teacher distribution.
    """
    ids = np.asarray(cached.ids, np.int64)
    lp = np.asarray(cached.logprobs, np.float32)
    tail = np.asarray(cached.tail_logmass, np.float32)
    counts = None if cached.counts is None else np.asarray(cached.counts, np.float32)
    if vmap is not None:
        mapped = vmap.map_ids(ids)
        lost = (ids >= 0) & (mapped < 0)
        if lost.any():
            if counts is None:
                lost_mass = np.logaddexp.reduce(np.where(lost, lp, -np.inf), axis=1)
                tail = np.logaddexp(tail, lost_mass).astype(np.float32)
            else:
                counts = np.where(lost, 0.0, counts).astype(np.float32)
            lp = np.where(lost, -np.inf, lp).astype(np.float32)
        ids = mapped
    return TeacherTargets(ids=ids, logprobs=lp, tail=tail, counts=counts, hidden=dict(cached.hidden),
                          attention_t2v=dict(cached.attention_t2v), attention_full=dict(cached.attention_full))


def sample_rows(targets: TeacherTargets, rows: SampleRows) -> TeacherTargets:
    """One sample's targets (views) out of a batch's (``CachedBatch.layout`` says where it lies)."""
    t = rows.tokens
    out = TeacherTargets(ids=targets.ids[t], logprobs=targets.logprobs[t], tail=targets.tail[t],
                         counts=None if targets.counts is None else targets.counts[t],
                         hidden={layer: h[t] for layer, h in targets.hidden.items()})
    rows.split_maps(targets.attention_t2v, "t2v", out.attention_t2v)
    rows.split_maps(targets.attention_full, "full", out.attention_full)
    return out


@dataclass
class DistillSample:
    """One training sample: the student's teacher-forced inputs plus every teacher's targets."""

    sample_id: str
    capability: str
    input_ids: np.ndarray  # [S] int64
    answer_start: int
    answer_ids: np.ndarray  # [T] int64
    image_token_mask: np.ndarray  # [S] bool
    model_inputs: dict[str, np.ndarray]
    teachers: dict[str, TeacherTargets]
    turn_starts: np.ndarray | None = None  # [n] each supervised turn's start (None: one turn at answer_start)
    turn_lengths: np.ndarray | None = None

    @property
    def target_positions(self) -> np.ndarray:
        """The input position predicting each answer token (``kd.cache_schema.turns``)."""
        if self.turn_starts is None:
            return target_positions(*single_turn(self.answer_start, len(self.answer_ids)))
        return target_positions(self.turn_starts, self.turn_lengths)


class SampleBatch(list):
    """A batch's samples as ``DistillDataset.__getitems__`` reads them, plus ``teachers``: each
    teacher's targets for the whole batch (rows concatenated in sample order, attention maps
    flattened), which ``collate`` uses as they are. Each sample's own ``teachers`` are views of them."""

    def __init__(self, samples: Sequence[DistillSample], teachers: dict[str, TeacherTargets]) -> None:
        super().__init__(samples)
        self.teachers = teachers
