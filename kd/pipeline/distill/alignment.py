"""The alignment proof: every cached answer token is the student's token, for every sample and teacher.

Alignment is proved, not assumed. A cache row ``j`` belongs to the position that predicts answer
token ``j`` (``answer_start - 1 + j``; each turn's, for a conversation: ``kd.cache_schema.turns``);
it means the same thing for the student only when the student tokenizes the answer into the same
ids, split into the same turns. So for every sample and teacher:

* without a vocabulary map, the hash of the student's answer ids must equal the cache's
  ``answer_ids_hash`` (checked for the whole dataset before training starts, from the index alone);
* with a vocabulary map (teacher with another tokenizer), the cached answer ids mapped to student
  ids must equal the student's answer ids (checked when the sample is read);
* every supervised turn has as many tokens for the student as in the cache (checked when read);
* attention maps additionally need the same keys: ``t2v`` maps the same number of image tokens,
  ``full`` maps the same sequence length and answer start.

A failure raises ``AlignmentError`` naming the sample, the teacher role and the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kd.cache_schema import hash_ids
from kd.pipeline.common.dataset import Record
from kd.pipeline.common.chat import render_pieces
from kd.pipeline.common.encoding import end_of_turn_token
from kd.pipeline.distill.teachers import AlignmentError, TeacherSource, _tokenizer_of


log = logging.getLogger(__name__)


def answer_token_ids(processor: Any, answer: str) -> np.ndarray:
    """The student's answer ids exactly as ``encoding.encode_sample`` makes them (answer + end of turn)."""
    return answer_token_ids_many(processor, [answer])[0]


def answer_token_ids_many(processor: Any, answers: Sequence[str]) -> list[np.ndarray]:
    """``answer_token_ids`` of several answers in one tokenizer call (~2x faster per answer)."""
    tok, end = _tokenizer_of(processor), end_of_turn_token(processor)
    encoded = tok([answer + end for answer in answers], add_special_tokens=False)["input_ids"]
    return [np.asarray(ids, np.int32) for ids in encoded]


def record_answer_ids(processor: Any, records: Sequence[Record]) -> list[np.ndarray]:
    """Each record's supervised ids as ``encoding.encode_sample`` makes them: one answer's, or every
    assistant turn's of a conversation, rendered by the chat template (``chat.render_pieces``)."""
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(records)
    single = [i for i, rec in enumerate(records) if not rec.is_multi_turn]
    for i, ids in zip(single, answer_token_ids_many(processor, [records[i].answer for i in single])):
        out[i] = ids
    tok = _tokenizer_of(processor)
    for i, rec in enumerate(records):
        if rec.is_multi_turn:
            turns = render_pieces(processor, rec.prompt_or_messages, None, len(rec.images), sample_id=rec.id).turns
            out[i] = np.asarray([t for ids in tok(list(turns), add_special_tokens=False)["input_ids"] for t in ids],
                                np.int32)
    return out


_ALIGN_BATCH = 4096  # answers tokenized per call by check_alignment


def alignment_error(sid: str, src: TeacherSource, what: str) -> AlignmentError:
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
    ids = record_answer_ids(processor, [rec])[0].tolist()
    what = f"student answer ids {ids} (hash {student_hash}) differ from the cached answer_ids_hash {cached_hash}"
    cache_tok = cache_tokenizer_hash(src)
    if cache_tok is not None:
        field, cache_hash = cache_tok
        tok_dir, tok_hash = student_tokenizer_hash(processor, field)
        if tok_hash and tok_hash != cache_hash:
            what = (f"the student tokenizer ({tok_dir}, {field} {tok_hash[:16]}) is not the one the cache was built "
                    f"with ({field} {cache_hash[:16]}); first mismatching sample: {what}; distil with the student "
                    f"tokenizer the cache was built for, or give vocab_maps.{src.role} to map between tokenizers")
    return alignment_error(rec.id, src, what)


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
        answer_ids = record_answer_ids(processor, [records[i] for i in part])
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
