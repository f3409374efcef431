"""The teacher caches a student trains from: each opened by role (``open_teachers``), with a
vocabulary map for a teacher of another tokenizer (``VocabMap``: ids matched by token string)."""

from __future__ import annotations

import logging
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd.cache_schema import CacheReader
from kd.cache_schema.reader import DEFAULT_CACHE_BYTES


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
                "vocab_map": self.vocab_map.source if self.vocab_map else None,
                # every cache read for this role: the cache itself, then its parents (a grown dataset)
                "caches": [link.describe() for link in self.reader.chain]}


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
