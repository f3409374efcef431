"""Training data: each sample's student encoding joined with every teacher's cached signals, aligned.

Alignment is proved, not assumed. A cache row ``j`` belongs to the position that predicts answer
token ``j`` (``answer_start - 1 + j``); it means the same thing for the student only when the
student tokenizes the answer into the same ids. So for every sample and teacher:

* without a vocabulary map, the hash of the student's answer ids must equal the cache's
  ``answer_ids_hash`` (checked for the whole dataset before training starts, from the index alone);
* with a vocabulary map (teacher with another tokenizer), the cached answer ids mapped to student
  ids must equal the student's answer ids (checked when the sample is read);
* attention maps additionally need the same keys: ``t2v`` maps the same number of image tokens,
  ``full`` maps the same sequence length and answer start.

A failure raises ``AlignmentError`` naming the sample, the teacher role and the cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kd.cache_schema import CachedBatch, CachedSample, CacheReader, SampleRows, hash_ids
from kd.cache_schema.reader import DEFAULT_CACHE_BYTES
from kd.pipeline.common.dataset import Record, RecordTable
from kd.pipeline.common.encoding import encode_record, end_of_turn_token

# The teacher engine's batching of processor outputs; the student batches the same way.
from kd.pipeline.common.model_inputs import batch_model_inputs

__all__ = [
    "AlignmentError", "VocabMap", "TeacherSource", "TeacherTargets", "DistillSample", "DistillDataset",
    "SampleBatch", "EpochSampler", "open_teachers", "answer_token_ids", "attention_layout", "check_alignment", "collate",
    "concat_targets", "flatten_maps", "map_shapes", "sample_rows", "to_student_ids",
]

log = logging.getLogger(__name__)


def _tokenizer_of(proc: Any) -> Any:
    return getattr(proc, "tokenizer", proc)


class AlignmentError(ValueError):
    """A sample's student tokens do not line up with a teacher cache."""


# ----------------------------------------------------------------------------- vocabulary maps


@dataclass
class VocabMap:
    """Teacher token id -> student token id as a dense table (``-1`` = no student token)."""

    table: np.ndarray
    source: str

    @classmethod
    def from_pairs(cls, pairs: Mapping[int, int], source: str) -> VocabMap:
        if not pairs:
            raise ValueError(f"vocab map {source}: empty")
        values = list(pairs.values())
        if len(set(values)) != len(values):
            raise ValueError(f"vocab map {source}: several teacher ids map to the same student id")
        if min(pairs) < 0 or min(values) < 0:
            raise ValueError(f"vocab map {source}: ids must be >= 0")
        table = np.full(max(pairs) + 1, -1, dtype=np.int64)
        for t, s in pairs.items():
            table[int(t)] = int(s)
        return cls(table, source)

    @classmethod
    def from_json(cls, path: str | Path) -> VocabMap:
        d = json.loads(Path(path).read_text())
        return cls.from_pairs({int(k): int(v) for k, v in d.items()}, str(path))

    @classmethod
    def from_tokenizers(cls, teacher_tok: Any, student_tok: Any, source: str = "tokenizers") -> VocabMap:
        """Map every teacher token whose exact string is also a student token."""
        student = _tokenizer_of(student_tok).get_vocab()
        teacher = _tokenizer_of(teacher_tok).get_vocab()
        return cls.from_pairs({tid: student[s] for s, tid in teacher.items() if s in student}, source)

    def map_ids(self, ids: np.ndarray) -> np.ndarray:
        """Map ids elementwise; padding (-1), unknown and out-of-table ids become -1."""
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(self.table))
        return np.where(ok, self.table[np.where(ok, ids, 0)], -1)

    def to_json(self) -> dict[str, int]:
        return {str(t): int(s) for t, s in enumerate(self.table) if s >= 0}


# ----------------------------------------------------------------------------- teacher caches


@dataclass
class TeacherSource:
    """One teacher: its role, its opened cache and an optional vocabulary map."""

    role: str
    url: str
    reader: CacheReader
    vocab_map: VocabMap | None = None

    @property
    def signals(self):
        return self.reader.signals

    @property
    def key(self) -> str:
        return self.reader.key

    @property
    def teacher_depth(self) -> int | None:
        """The teacher's decoder layer count when the manifest lets us know it, else None."""
        teacher = self.reader.manifest.teacher if self.reader.manifest else {}
        for k in ("num_layers", "num_hidden_layers"):
            if isinstance(teacher.get(k), int):
                return int(teacher[k])
        model_dir = teacher.get("model_dir")
        if model_dir and (Path(model_dir) / "config.json").exists():
            from transformers import AutoConfig

            from kd.pipeline.common.model_files import num_text_layers

            try:
                return num_text_layers(AutoConfig.from_pretrained(model_dir))
            except Exception:  # an unreadable config only loses a default
                return None
        return None

    def describe(self) -> dict[str, Any]:
        """What a run directory records about the cache it read (``teachers.json``)."""
        m = self.reader.manifest
        return {"url": self.url, "key": self.key, "signals": self.signals.to_dict(),
                "teacher": m.teacher if m else None, "samples": len(self.reader),
                "vocab_map": self.vocab_map.source if self.vocab_map else None}


def open_teachers(teachers: Mapping[str, str], vocab_maps: Mapping[str, str] | None = None,
                  student_tokenizer: Any = None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict[str, TeacherSource]:
    """Open each ``{role: cache url}``; ``vocab_maps[role]`` is a JSON file, a tokenizer dir or ``"auto"``.

    ``cache_bytes`` bounds the decoded-chunk LRUs of all teachers together (split evenly), so
    memory does not grow with the number of teachers.
    """
    out = {}
    per_teacher = max(1, cache_bytes // max(1, len(teachers)))
    for role, url in teachers.items():
        reader = CacheReader(url, cache_bytes=per_teacher)
        recorded = (reader.manifest.teacher or {}).get("role") if reader.manifest else None
        if recorded and recorded != role:
            log.warning("cache %s was built for role %r and serves role %r here", url, recorded, role)
        vmap = None
        spec = (vocab_maps or {}).get(role)
        if spec is not None:
            if student_tokenizer is None:
                raise ValueError("a vocab map needs the student tokenizer")
            if spec == "auto":
                spec = (reader.manifest.teacher or {}).get("model_dir") if reader.manifest else None
                if not spec:
                    raise ValueError(f"teacher {role!r}: cache {url} records no teacher model_dir for vocab_map=auto")
                if not Path(spec).is_dir():  # built on another machine: the tokenizer must be named explicitly
                    raise ValueError(f"teacher {role!r}: cache {url} records teacher model_dir {spec}, which is not a "
                                     "directory here; give vocab_maps.<role> as a tokenizer dir or JSON map")
            if Path(spec).is_dir():
                from transformers import AutoTokenizer

                vmap = VocabMap.from_tokenizers(AutoTokenizer.from_pretrained(spec), student_tokenizer, spec)
            else:
                vmap = VocabMap.from_json(spec)
        out[role] = TeacherSource(role, reader.location.url, reader, vmap)
    return out


def answer_token_ids(processor: Any, answer: str) -> np.ndarray:
    """The student's answer ids exactly as ``encoding.encode_sample`` makes them (answer + end of turn)."""
    return answer_token_ids_many(processor, [answer])[0]


def answer_token_ids_many(processor: Any, answers: Sequence[str]) -> list[np.ndarray]:
    """``answer_token_ids`` of several answers in one tokenizer call (~2x faster per answer)."""
    tok, end = _tokenizer_of(processor), end_of_turn_token(processor)
    encoded = tok([answer + end for answer in answers], add_special_tokens=False)["input_ids"]
    return [np.asarray(ids, np.int32) for ids in encoded]


_ALIGN_BATCH = 4096  # answers tokenized per call by check_alignment


def _mismatch(sid: str, src: TeacherSource, what: str) -> AlignmentError:
    return AlignmentError(f"sample {sid!r}: {what} (teacher {src.role!r}, cache {src.url})")


def cache_tokenizer_hash(src: TeacherSource) -> tuple[str, str] | None:
    """``(field, hash)`` of the tokenizer a cache was built with: ``vocab_sha256`` (token-id files
    only) when its manifest records it, else ``tokenizer_sha256``, else the key's tokenizer input."""
    m = src.reader.manifest
    if m is None:
        return None
    teacher = m.teacher or {}
    for name in ("vocab_sha256", "tokenizer_sha256"):
        if teacher.get(name):
            return name, str(teacher[name])
    return ("tokenizer_sha256", str(m.key_inputs["tokenizer"])) if m.key_inputs.get("tokenizer") else None


def student_tokenizer_hash(processor: Any, field: str) -> tuple[str | None, str | None]:
    """(directory, hash by the ``field`` recipe) of the student's tokenizer; None unless it is a local dir."""
    from kd.pipeline.common.model_files import tokenizer_sha256, vocab_sha256

    path = getattr(_tokenizer_of(processor), "name_or_path", None)
    if path and Path(path).is_dir():
        return str(path), (vocab_sha256 if field == "vocab_sha256" else tokenizer_sha256)(path)
    return path or None, None


def _answer_mismatch(rec: Record, src: TeacherSource, processor: Any, student_hash: str,
                     cached_hash: str) -> AlignmentError:
    """The first sample whose answer ids differ, explained by the tokenizers when they differ."""
    ids = answer_token_ids(processor, rec.answer).tolist()
    what = f"student answer ids {ids} (hash {student_hash}) differ from the cached answer_ids_hash {cached_hash}"
    cache_tok = cache_tokenizer_hash(src)
    if cache_tok is not None:
        field, cache_hash = cache_tok
        tok_dir, tok_hash = student_tokenizer_hash(processor, field)
        if tok_hash and tok_hash != cache_hash:
            what = (f"the student tokenizer ({tok_dir}, {field} {tok_hash[:16]}) is not the one the cache was built "
                    f"with ({field} {cache_hash[:16]}); first mismatching sample: {what}; distil with the student "
                    f"tokenizer the cache was built for, or give vocab_maps.{src.role} to map between tokenizers")
    return _mismatch(rec.id, src, what)


def require_same_vocab(src: TeacherSource, processor: Any) -> None:
    """Refuse a teacher without a vocab map whose token-id files differ from the student's.

    Answers can align token for token while the vocabularies differ elsewhere (InternVL3 and
    Qwen2.5-VL share Qwen2.5's base vocabulary, not their special tokens): a cached top-k id of a
    token the student lacks, or holds under another id, would be trained on as the student's
    token of that id. A vocab map translates ids by token string and folds the rest into the tail.
    """
    cache_tok = cache_tokenizer_hash(src)
    if cache_tok is None or cache_tok[0] != "vocab_sha256":
        return
    path, student_hash = student_tokenizer_hash(processor, "vocab_sha256")
    if student_hash is not None and student_hash != cache_tok[1]:
        raise AlignmentError(
            f"teacher {src.role!r} (cache {src.url}) was built with another vocabulary than the student's ({path}: "
            f"vocab_sha256 {student_hash[:16]} vs {cache_tok[1][:16]}): its top-k ids would be read as the student's "
            f"ids of other tokens. Set vocab_maps.{src.role}=auto (the teacher dir the cache records), a tokenizer "
            "dir or a JSON map: ids are matched by token string and the rest folds into the tail")


def check_alignment(records: Sequence[Record], processor: Any, sources: Mapping[str, TeacherSource],
                    missing: str = "error") -> list[Record]:
    """Check every record against every cache before training; return the records to train on.

    Missing samples raise (``missing="error"``) or are dropped (``"skip"``). Answer ids are
    checked here for teachers without a vocab map (by hash, from the cache index alone); mapped
    teachers are checked when each sample is read.
    """
    record_ids = [rec.id for rec in records]
    rows = {role: src.reader.rows_of(record_ids) for role, src in sources.items()}
    # cached answer hashes in record order (row 0's for a record the cache lacks: never compared)
    hashes = {role: src.reader.index_column("answer_ids_hash", np.maximum(rows[role], 0)) if len(src.reader) else []
              for role, src in sources.items()}
    absent = {role: [record_ids[i] for i in np.flatnonzero(rows[role] < 0)] for role in sources}
    held = np.ones(len(records), bool)
    for role in sources:
        held &= rows[role] >= 0
    present = np.flatnonzero(held).tolist()
    checked = [role for role, src in sources.items() if src.vocab_map is None]
    for start in range(0, len(present) if checked else 0, _ALIGN_BATCH):  # tokenized a batch at a time
        part = present[start : start + _ALIGN_BATCH]
        answer_ids = answer_token_ids_many(processor, [records[i].answer for i in part])
        for i, ids in zip(part, answer_ids):
            student_hash = hash_ids(ids)
            for role in checked:
                if hashes[role][i] != student_hash:
                    raise _answer_mismatch(records[i], sources[role], processor, student_hash, hashes[role][i])
    for role in checked:  # answers that align do not prove the rest of the vocabulary does
        require_same_vocab(sources[role], processor)
    kept = [records[i] for i in present]
    for role, ids in absent.items():
        if ids and missing == "error":
            raise KeyError(f"{len(ids)} sample(s) missing from cache {sources[role].url} (teacher {role!r}): "
                           f"{ids[:5]}{' ...' if len(ids) > 5 else ''}; set missing=skip to train without them")
        if ids:
            log.warning("skipping %d sample(s) missing from cache %s (teacher %r)", len(ids), sources[role].url, role)
    if not kept:
        raise ValueError("no sample is present in every teacher cache")
    return kept


# ----------------------------------------------------------------------------- samples


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
                                 image_token_mask=enc.image_token_mask, model_inputs=enc.model_inputs, teachers=teachers)
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
        if ok and cached.attention_t2v:
            ok = np.array_equal(cached.attention_keys["t2v"], [int(enc.image_token_mask.sum()) for enc in encs])
        if ok and cached.attention_full:
            ok = (np.array_equal(cached.seq_len, [len(enc.input_ids) for enc in encs])
                  and np.array_equal(cached.answer_start, [enc.answer_start for enc in encs]))
        if not ok:
            for b, (rec, enc) in enumerate(zip(recs, encs)):
                self._check(rec.id, enc, hashes[b], cached.sample(b), src)
            raise _mismatch(recs[0].id, src, "the batch does not line up with the cache")  # a guard: _check raised first

    @staticmethod
    def _check(sid: str, enc, answer_hash: str, cached: CachedSample, src: TeacherSource) -> None:
        if src.vocab_map is None:
            if cached.answer_ids_hash != answer_hash or not np.array_equal(cached.target_ids, enc.answer_ids):
                raise _mismatch(sid, src, f"student answer ids {enc.answer_ids.tolist()} differ from the cached "
                                f"ones {np.asarray(cached.target_ids).tolist()}")
        else:
            mapped = src.vocab_map.map_ids(cached.target_ids)
            if not np.array_equal(mapped, enc.answer_ids):
                raise _mismatch(sid, src, f"cached answer ids {np.asarray(cached.target_ids).tolist()} map to "
                                f"{mapped.tolist()} (vocab map {src.vocab_map.source}), student has "
                                f"{enc.answer_ids.tolist()}")
        if cached.attention_t2v:
            n_img = int(enc.image_token_mask.sum())
            keys = next(iter(cached.attention_t2v.values())).shape[1]
            if keys != n_img:
                raise _mismatch(sid, src, f"cached t2v maps have {keys} image keys, the student input has {n_img} "
                                "image tokens")
        if cached.attention_full and (cached.seq_len != len(enc.input_ids) or cached.answer_start != enc.answer_start):
            raise _mismatch(sid, src, f"cached full attention maps cover {cached.seq_len} tokens with the answer at "
                            f"{cached.answer_start}; the student input has {len(enc.input_ids)} tokens with the "
                            f"answer at {enc.answer_start}")


class SampleBatch(list):
    """A batch's samples as ``DistillDataset.__getitems__`` reads them, plus ``teachers``: each
    teacher's targets for the whole batch (rows concatenated in sample order, attention maps
    flattened), which ``collate`` uses as they are. Each sample's own ``teachers`` are views of them."""

    def __init__(self, samples: Sequence[DistillSample], teachers: dict[str, TeacherTargets]) -> None:
        super().__init__(samples)
        self.teachers = teachers


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


# ----------------------------------------------------------------------------- batching


def collate(samples: Sequence[DistillSample], pad_id: int = 0) -> dict[str, Any]:
    """Right-padded student inputs plus teacher targets flattened over answer tokens.

    Row ``n`` of every token-level tensor is one answer token; sample ``b`` owns the
    ``num_tokens[b]`` consecutive rows starting at ``sum(num_tokens[:b])``. Attention maps are
    flattened too (``flatten_maps``: every sample's ``[T_b, K_b]`` map, row-major, concatenated), and
    ``attention_layout[kind]`` says where each element sits in the student's padded maps. A
    ``SampleBatch`` (the DataLoader's batches of a ``DistillDataset``) brings its teachers' targets
    already in that form; they are used as they are.
    """
    b = len(samples)
    lengths = [len(s.input_ids) for s in samples]
    ids = torch.full((b, max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros((b, max(lengths)), dtype=torch.long)
    image_mask = torch.zeros((b, max(lengths)), dtype=torch.bool)
    for i, s in enumerate(samples):
        ids[i, : lengths[i]] = torch.from_numpy(s.input_ids)
        mask[i, : lengths[i]] = 1
        image_mask[i, : lengths[i]] = torch.from_numpy(s.image_token_mask)
    stacked = batch_model_inputs([s.model_inputs for s in samples], lengths)
    batch: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "image_mask": image_mask,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "answer_start": torch.tensor([s.answer_start for s in samples], dtype=torch.long),
        "num_tokens": torch.tensor([len(s.answer_ids) for s in samples], dtype=torch.long),
        "targets": torch.from_numpy(np.concatenate([s.answer_ids for s in samples])),
        "sample_ids": [s.sample_id for s in samples],
        "capabilities": [s.capability for s in samples],
        "model_inputs": None if stacked is None else {k: torch.from_numpy(v) for k, v in stacked.items()},
        "per_sample_inputs": None if stacked is not None else
        [{k: torch.from_numpy(v) for k, v in s.model_inputs.items()} for s in samples],
        "teachers": {},
        "attention_layout": {},
    }
    kinds = [kind for kind in ("t2v", "full") if any(getattr(t, f"attention_{kind}") for t in samples[0].teachers.values())]
    shapes = {kind: map_shapes(batch, kind) for kind in kinds}
    batch["attention_layout"] = {kind: attention_layout(batch, kind) for kind in kinds}
    read_together = samples.teachers if isinstance(samples, SampleBatch) else None
    for role in samples[0].teachers:
        if read_together is not None:  # rows already concatenated, maps flattened, shapes checked on read
            targets = read_together[role]
        else:
            targets = concat_targets([s.teachers[role] for s in samples], shapes, batch["sample_ids"], role)
        batch["teachers"][role] = _teacher_entry(targets, shapes, role)
    return batch


def concat_targets(ts: Sequence[TeacherTargets], shapes: Mapping[str, Sequence[tuple[int, int]]],
                   sample_ids: Sequence[str], role: str) -> TeacherTargets:
    """Several samples' targets as one batch's: rows concatenated (narrower rows padded to the widest
    with id -1 / log-prob -inf / count 0), maps flattened by ``flatten_maps`` against ``shapes``."""
    k = max(t.ids.shape[1] for t in ts)

    def entries(arrs: list[np.ndarray], value: float) -> np.ndarray:
        if any(a.shape[1] != k for a in arrs):  # only sampled caches have rows narrower than k
            arrs = [np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=value) for a in arrs]
        return np.concatenate(arrs)

    out = TeacherTargets(ids=entries([t.ids for t in ts], -1), logprobs=entries([t.logprobs for t in ts], -np.inf),
                         tail=np.concatenate([t.tail for t in ts]),
                         counts=None if ts[0].counts is None else entries([t.counts for t in ts], 0),
                         hidden={layer: np.concatenate([t.hidden[layer] for t in ts]) for layer in ts[0].hidden})
    for kind in ("t2v", "full"):
        for layer in getattr(ts[0], f"attention_{kind}"):
            getattr(out, f"attention_{kind}")[layer] = flatten_maps(
                [getattr(t, f"attention_{kind}")[layer] for t in ts], shapes[kind], sample_ids,
                f"teacher {role!r}: cached {kind} map")
    return out


def _teacher_entry(t: TeacherTargets, shapes: Mapping[str, Sequence[tuple[int, int]]], role: str) -> dict[str, Any]:
    """One teacher's part of a collated batch, as tensors of the dtypes the objective reads."""
    entry: dict[str, Any] = {
        "ids": torch.as_tensor(t.ids).long(),
        "logprobs": torch.as_tensor(t.logprobs).float(),
        "tail": torch.as_tensor(t.tail).float(),
        "hidden": {layer: torch.as_tensor(h).float() for layer, h in t.hidden.items()},
    }
    for kind in ("t2v", "full"):
        maps = entry[f"attention_{kind}"] = {}
        for layer, flat in getattr(t, f"attention_{kind}").items():
            expected = sum(rows * keys for rows, keys in shapes[kind])
            if flat.shape[0] != expected:
                raise ValueError(f"teacher {role!r}: cached {kind} maps of layer {layer} have {flat.shape[0]} elements, "
                                 f"the student's maps {expected}")
            maps[layer] = torch.as_tensor(flat).float()
    if t.counts is not None:
        entry["counts"] = torch.as_tensor(t.counts).float()
    return entry


def map_shapes(batch: Mapping[str, Any], kind: str) -> list[tuple[int, int]]:
    """Each sample's ``(answer tokens, keys)`` of a ``kind`` map: keys are its image tokens (t2v) or
    all its tokens (full), as the student's maps are read."""
    keys = batch["image_mask"].sum(1) if kind == "t2v" else batch["lengths"]
    return list(zip(batch["num_tokens"].tolist(), keys.tolist()))


def attention_layout(batch: Mapping[str, Any], kind: str) -> dict[str, torch.Tensor]:
    """Where the elements of flattened ``kind`` maps (``flatten_maps``) sit in the student's padded
    maps ``[B, T_max, S]`` (``StudentOutputs.attention_padded``): ``index`` ``[E]`` into their flat
    view and ``sample`` ``[E]``, the sample each element belongs to. Built on the CPU (in the loader,
    by ``collate``), so the training step only gathers."""
    num_tokens, lengths = batch["num_tokens"].tolist(), batch["lengths"].tolist()
    t_max, width = max(num_tokens), batch["input_ids"].shape[1]
    image = batch["image_mask"].cpu().numpy()  # False past each sample's length
    index = [np.add.outer(np.arange(b * t_max, b * t_max + t_b) * width,
                          np.flatnonzero(image[b]) if kind == "t2v" else np.arange(n)).ravel()
             for b, (t_b, n) in enumerate(zip(num_tokens, lengths))]
    sample = np.repeat(np.arange(len(index)), [len(i) for i in index])
    return {"index": torch.from_numpy(np.concatenate(index).astype(np.int64, copy=False)),
            "sample": torch.from_numpy(sample.astype(np.int64, copy=False))}


def flatten_maps(maps: Sequence[np.ndarray | torch.Tensor], shapes: Sequence[tuple[int, int]],
                 sample_ids: Sequence[str], what: str) -> torch.Tensor:
    """Every sample's ``[T_b, K_b]`` map (``shapes[b]``, from ``map_shapes``), row-major, concatenated
    into ``[E]`` float32 in ``attention_layout`` order; a map of another shape raises ``ValueError``."""
    for sid, m, shape in zip(sample_ids, maps, shapes):
        if tuple(m.shape) != shape:
            raise ValueError(f"sample {sid!r}, {what} {tuple(m.shape)} vs student {shape}")
    if all(isinstance(m, np.ndarray) for m in maps):  # the loader's case: one numpy call
        return torch.from_numpy(np.concatenate(maps, axis=None).astype(np.float32, copy=False))
    return torch.cat([torch.as_tensor(m).reshape(-1) for m in maps]).float()
