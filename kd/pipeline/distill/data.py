"""Training data: each sample's student encoding joined with every teacher's cached signals.

``DistillDataset`` proves alignment (``alignment``: every cached answer token is the student's,
for every sample and teacher) before the first batch and again per batch as it reads; a
failure raises ``AlignmentError`` naming the sample, the teacher role and the cache. The
teachers (``teachers``), the per-sample targets (``targets``) and batching (``batching``) live
beside it; their names are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kd.cache_schema import CachedBatch, CachedSample
from kd.pipeline.common.dataset import Record, RecordTable
from kd.pipeline.common.encoding import encode_record
from kd.pipeline.distill.alignment import AlignmentError, alignment_error, answer_token_ids, check_alignment
from kd.pipeline.distill.batching import attention_layout, collate, concat_targets, flatten_maps, map_shapes  # noqa: F401
from kd.pipeline.distill.targets import (DistillSample, SampleBatch, TeacherTargets, sample_rows,  # noqa: F401
                                        to_student_ids)
from kd.pipeline.distill.teachers import TeacherSource, VocabMap, open_teachers  # noqa: F401

__all__ = [
    "AlignmentError", "VocabMap", "TeacherSource", "TeacherTargets", "DistillSample", "DistillDataset",
    "SampleBatch", "EpochSampler", "open_teachers", "answer_token_ids", "attention_layout", "check_alignment", "collate",
    "concat_targets", "flatten_maps", "map_shapes", "sample_rows", "to_student_ids",
]

log = logging.getLogger(__name__)


class DistillDataset(Dataset):
    """Records encoded for the student and joined with the teacher caches by sample id."""

    def __init__(self, records: Sequence[Record], processor: Any, sources: Mapping[str, TeacherSource],
                 *, missing: str = "error") -> None:
        self.processor = processor
        self.sources = dict(sources)
        # Arrow columns, not Record objects: data-loader workers share them instead of copying them.
        self.records = RecordTable(check_alignment(records, processor, self.sources, missing))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> DistillSample:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> SampleBatch:
        """The samples at ``indices``, each teacher's signals read for all of them at once
        (``CacheReader.get_batch``). torch's DataLoader calls this with each batch's indices."""
        recs = self.records.take(indices)
        encs = [encode_record(self.processor, rec.as_dict()) for rec in recs]
        hashes = [enc.answer_hash for enc in encs] if self.sources else []
        batch_targets: dict[str, TeacherTargets] = {}
        per_sample: list[dict[str, TeacherTargets]] = [{} for _ in recs]
        for role, src in self.sources.items():
            cached = src.reader.get_batch([rec.id for rec in recs])
            self._check_batch(recs, encs, hashes, cached, src)
            targets = batch_targets[role] = to_student_ids(cached, src.vocab_map)
            for b, rows in enumerate(cached.layout):
                per_sample[b][role] = sample_rows(targets, rows)
        samples = [DistillSample(sample_id=rec.id, capability=rec.capability, input_ids=enc.input_ids.astype(np.int64),
                                 answer_start=enc.answer_start, answer_ids=enc.answer_ids.astype(np.int64),
                                 image_token_mask=enc.image_token_mask, model_inputs=enc.model_inputs, teachers=teachers,
                                 turn_starts=enc.turn_starts, turn_lengths=enc.turn_lengths)
                   for rec, enc, teachers in zip(recs, encs, per_sample)]
        return SampleBatch(samples, batch_targets)

    def _check_batch(self, recs: Sequence[Record], encs: Sequence[Any], hashes: Sequence[str], cached: CachedBatch,
                     src: TeacherSource) -> None:
        """Every sample of a batch against one teacher's rows, compared for the whole batch at once;
        on a difference, sample by sample (``_check``) to name the first one that fails."""
        answers = np.concatenate([enc.answer_ids for enc in encs])
        if src.vocab_map is None:
            ok = cached.answer_ids_hash == list(hashes) and np.array_equal(cached.target_ids, answers)
        else:
            ok = np.array_equal(src.vocab_map.map_ids(cached.target_ids), answers)
        if ok and cached.num_turns is not None:  # the same tokens, split into the same turns
            ok = (np.array_equal(cached.num_turns, [len(enc.turn_lengths) for enc in encs])
                  and np.array_equal(cached.turn_lengths, np.concatenate([enc.turn_lengths for enc in encs])))
        if ok and cached.attention_t2v:
            ok = np.array_equal(cached.attention_keys["t2v"], [int(enc.image_token_mask.sum()) for enc in encs])
        if ok and cached.attention_full:
            ok = (np.array_equal(cached.seq_len, [len(enc.input_ids) for enc in encs])
                  and np.array_equal(cached.turn_starts, np.concatenate([enc.turn_starts for enc in encs])))
        if not ok:
            for b, (rec, enc) in enumerate(zip(recs, encs)):
                self._check(rec.id, enc, hashes[b], cached.sample(b), src)
            raise alignment_error(recs[0].id, src, "the batch does not line up with the cache")  # a guard: _check raised first

    @staticmethod
    def _check(sid: str, enc, answer_hash: str, cached: CachedSample, src: TeacherSource) -> None:
        if src.vocab_map is None:
            if cached.answer_ids_hash != answer_hash or not np.array_equal(cached.target_ids, enc.answer_ids):
                raise alignment_error(sid, src, f"student answer ids {enc.answer_ids.tolist()} differ from the cached "
                                f"ones {np.asarray(cached.target_ids).tolist()}")
        else:
            mapped = src.vocab_map.map_ids(cached.target_ids)
            if not np.array_equal(mapped, enc.answer_ids):
                raise alignment_error(sid, src, f"cached answer ids {np.asarray(cached.target_ids).tolist()} map to "
                                f"{mapped.tolist()} (vocab map {src.vocab_map.source}), student has "
                                f"{enc.answer_ids.tolist()}")
        if not np.array_equal(cached.turn_lengths, enc.turn_lengths):
            raise alignment_error(sid, src, f"cached turns of {cached.turn_lengths.tolist()} tokens, the student's of "
                            f"{enc.turn_lengths.tolist()}: the same tokens split into other assistant turns")
        if cached.attention_t2v:
            n_img = int(enc.image_token_mask.sum())
            keys = next(iter(cached.attention_t2v.values())).shape[1]
            if keys != n_img:
                raise alignment_error(sid, src, f"cached t2v maps have {keys} image keys, the student input has {n_img} "
                                "image tokens")
        if cached.attention_full and (cached.seq_len != len(enc.input_ids)
                                      or not np.array_equal(cached.turn_starts, enc.turn_starts)):
            raise alignment_error(sid, src, f"cached full attention maps cover {cached.seq_len} tokens with the answer at "
                            f"{cached.turn_starts.tolist()}; the student input has {len(enc.input_ids)} tokens with the "
                            f"answer at {enc.turn_starts.tolist()}")


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch (``set_epoch``), identical on every rank and after a resume."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())
