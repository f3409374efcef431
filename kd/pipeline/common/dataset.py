"""Stage-one dataset input: a JSONL file of records, validated in full before anything runs.

One JSON object per line::

    {"id": "a1", "images": ["imgs/a1.png"], "prompt": "What colour is the light?",
     "answer": "red", "capability": "perception", "split": "train"}

* ``id``: unique, non-empty string (the cache key of the sample).
* ``images``: list of paths, zero or more (absent or ``null``: a text-only record, the same as
  ``[]``); relative paths resolve against the JSONL's folder (subfolders and ``..`` allowed),
  absolute paths are taken as they are.
* exactly one of ``prompt`` (non-empty string) or ``messages`` (chat turns
  ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; system only first). ``null``
  counts as absent.
* ``answer``: non-empty string, the next assistant turn after ``prompt`` / ``messages`` (whose last
  turn is then ``user``). Or no ``answer`` and ``messages`` that end with an assistant turn: a
  multi-turn record, every assistant turn (non-empty) supervised in one sample.
* ``capability``: non-empty tag (perception / reasoning / planning / ...).
* any other key is kept as metadata (``Record.meta``), e.g. ``split``.

Why validate everything up front: a cache build runs teachers for hours; a bad line found at
sample 90 000 wastes that run. ``load_records`` reports every problem in one ``DatasetError``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
KNOWN_KEYS = frozenset({"id", "images", "prompt", "messages", "answer", "capability"})
MAX_LISTED = 20
FINGERPRINT_VERSION = "kd-dataset-v1"
_CHUNK = 1 << 20


class Problem(NamedTuple):
    """One validation problem: 1-based line (None for file-level), field, what is wrong."""

    line: int | None
    field: str
    message: str


class DatasetError(ValueError):
    """Every problem found in a dataset file; the message lists the first ``MAX_LISTED``."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.path = path
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in dataset {path}:"]
        for p in problems[:MAX_LISTED]:
            where = f"{path}:{p.line}" if p.line is not None else str(path)
            lines.append(f"  {where}: {p.field}: {p.message}")
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Record:
    """One validated sample. ``messages`` is a tuple of ``(role, content)`` pairs (hashable)."""

    id: str
    images: tuple[Path, ...]
    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    answer: str | None  # None: a multi-turn record, every assistant turn of ``messages`` supervised
    capability: str
    line: int
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def prompt_or_messages(self) -> str | list[dict[str, str]]:
        """What ``encoding.encode_sample`` takes: the prompt string or the chat turns as dicts."""
        if self.prompt is not None:
            return self.prompt
        return [{"role": r, "content": c} for r, c in self.messages or ()]

    @property
    def is_multi_turn(self) -> bool:
        return self.answer is None

    @property
    def final_answer(self) -> str:
        """The answer to the last prompt: ``answer``, or a multi-turn record's last assistant turn."""
        return self.answer if self.answer is not None else self.messages[-1][1]

    def as_dict(self) -> dict[str, Any]:
        """The record as a JSONL-style mapping (absolute image paths), e.g. for ``encode_record``."""
        out: dict[str, Any] = {"id": self.id, "images": [str(p) for p in self.images]}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        else:
            out["messages"] = self.prompt_or_messages
        if self.answer is not None:
            out["answer"] = self.answer
        out["capability"] = self.capability
        out.update(self.meta)
        return out


class RecordTable(Sequence[Record]):
    """Records held as one buffer of compact JSON rows; a ``Record`` is built when one is read.

    A list of Records costs ~0.7 KB of Python objects per record (~0.7 GB at 1M), and each
    data-loader worker ends up with its own copy of those pages, as reference counts touch them
    (the records of every batch it reads). A numpy buffer has no reference counts: forked workers
    keep sharing it (~260 bytes per record here). Reads: ``table[i]``, ``table.take(indices)``,
    iteration; ``capabilities()`` without building any record.
    """

    def __init__(self, records: Iterable[Record]) -> None:
        records = list(records)
        rows = [json.dumps([r.id, [str(p) for p in r.images], r.prompt, r.messages, r.answer, r.line, dict(r.meta)],
                           ensure_ascii=False).encode() for r in records]
        self._offsets = np.zeros(len(rows) + 1, np.int64)
        self._offsets[1:] = np.cumsum([len(row) for row in rows])
        self._buffer = np.frombuffer(b"".join(rows), np.uint8)
        names: dict[str, int] = {}
        self._capability = np.array([names.setdefault(r.capability, len(names)) for r in records], np.int32)
        self._capability_names = list(names)

    def __len__(self) -> int:
        return len(self._capability)

    @overload
    def __getitem__(self, i: int) -> Record: ...

    @overload
    def __getitem__(self, i: slice) -> list[Record]: ...

    def __getitem__(self, i: int | slice) -> Record | list[Record]:
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({n} records)")
        return self._record(i % n)

    def __iter__(self) -> Iterator[Record]:
        return (self._record(i) for i in range(len(self)))

    def take(self, indices: Iterable[int]) -> list[Record]:
        """The records at ``indices``, in that order (a DataLoader batch's read)."""
        return [self[i] for i in indices]

    def capabilities(self) -> list[str]:
        """Every record's capability, in order."""
        names = self._capability_names
        return [names[c] for c in self._capability.tolist()]

    def _record(self, i: int) -> Record:
        rid, images, prompt, messages, answer, line, meta = json.loads(
            self._buffer[self._offsets[i] : self._offsets[i + 1]].tobytes())
        return Record(id=rid, images=tuple(Path(p) for p in images), prompt=prompt,
                      messages=None if messages is None else tuple(tuple(t) for t in messages), answer=answer,
                      capability=self._capability_names[self._capability[i]], line=line, meta=meta)


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully decoded as RGB (pixels as stored: no EXIF rotation, same for every model)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def check_image_file(path: Path) -> str | None:
    """None if ``path`` is a non-empty file PIL can parse, else what is wrong.

    ``verify()`` reads headers and chunk checksums without decoding pixels, so a check of
    100k camera frames stays cheap; a JPEG truncated mid-scan can still pass it.
    """
    try:
        if not path.exists():
            return f"image file not found: {path}"
        if not path.is_file():
            return f"image path is not a file: {path}"
        if path.stat().st_size == 0:
            return f"image file is empty (0 bytes): {path}"
        with Image.open(path) as im:
            im.verify()
    except OSError as e:  # PermissionError, UnidentifiedImageError, truncated/corrupt data
        return f"unreadable image {path}: {type(e).__name__}: {e}"
    except Exception as e:  # PIL raises assorted errors (SyntaxError, DecompressionBombError, ...)
        return f"unreadable image {path}: {type(e).__name__}: {e}"
    return None


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_messages(value: Any, add, multi_turn: bool) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, list) or not value:
        add("messages", f"must be a non-empty list of {{role, content}} objects, got {_type_name(value)}")
        return None
    turns: list[tuple[str, str]] = []
    ok = True
    for i, m in enumerate(value):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            add(f, f"must be an object, got {_type_name(m)}")
            ok = False
            continue
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            add(f, f"unexpected keys {extra} (only 'role' and 'content')")
            ok = False
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            add(f"{f}.role", f"must be one of {list(ROLES)}, got {role!r}")
            ok = False
        elif role == "system" and i != 0:
            add(f"{f}.role", "a system turn may only come first")
            ok = False
        if not isinstance(content, str):
            add(f"{f}.content", f"must be a string, got {_type_name(content)}")
            ok = False
        if ok:
            turns.append((role, content))
    if ok and multi_turn:  # every assistant turn is supervised
        if turns[-1][0] != "assistant":
            add(f"messages[{len(turns) - 1}].role", "without 'answer', the last turn must be 'assistant' (every "
                f"assistant turn is supervised), got {turns[-1][0]!r}; or give the answer as 'answer'")
            ok = False
        for i, (role, content) in enumerate(turns):
            if role == "assistant" and not content.strip():
                add(f"messages[{i}].content", "empty assistant turn (a supervised turn must be non-empty)")
                ok = False
    elif ok and turns[-1][0] != "user":
        add(f"messages[{len(turns) - 1}].role",
            f"last turn must be 'user' (the answer is the next assistant turn), got {turns[-1][0]!r}; "
            "or leave out 'answer' to supervise every assistant turn")
        ok = False
    return tuple(turns) if ok else None


def _parse_record(obj: Any, lineno: int, base: Path, check_images: bool,
                  image_cache: dict[Path, str | None], problems: list[Problem]) -> Record | None:
    n_before = len(problems)

    def add(fld: str, msg: str) -> None:
        problems.append(Problem(lineno, fld, msg))

    if not isinstance(obj, dict):
        add("record", f"must be a JSON object, got {_type_name(obj)}")
        return None
    multi_turn = "answer" not in obj and isinstance(obj.get("messages"), list) and obj.get("prompt") is None
    for key in ("id", "capability") if multi_turn else ("id", "answer", "capability"):
        if key not in obj:
            add(key, "missing required field")
    rid = obj.get("id")
    if "id" in obj and not _nonempty_str(rid):
        add("id", f"must be a non-empty string, got {rid!r}")
    for key in ("answer", "capability"):
        if key in obj and not _nonempty_str(obj[key]):
            what = "empty" if isinstance(obj[key], str) else f"wrong type {_type_name(obj[key])}"
            add(key, f"must be a non-empty string ({what}: {obj[key]!r})")

    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is not None and messages is not None:
        add("prompt/messages", "give exactly one of 'prompt' or 'messages', not both")
    elif prompt is None and messages is None:
        add("prompt/messages", "missing: give exactly one of 'prompt' or 'messages'")
    elif prompt is not None and not _nonempty_str(prompt):
        add("prompt", f"must be a non-empty string, got {prompt!r}")
    parsed_messages = _parse_messages(messages, add, multi_turn) if messages is not None and prompt is None else None

    images: list[Path] = []
    raw_images = obj.get("images")
    if raw_images is not None and not isinstance(raw_images, list):
        add("images", f"must be a list of paths, got {_type_name(raw_images)}")
    elif isinstance(raw_images, list):
        for i, s in enumerate(raw_images):
            if not _nonempty_str(s) or "\x00" in s:
                add(f"images[{i}]", f"must be a non-empty path string, got {s!r}")
                continue
            p = Path(s)
            p = (p if p.is_absolute() else base / p).resolve()
            images.append(p)
            if check_images:
                if p not in image_cache:
                    image_cache[p] = check_image_file(p)
                if image_cache[p]:
                    add(f"images[{i}]", image_cache[p])

    texts = [prompt] if isinstance(prompt, str) else [c for _, c in parsed_messages or ()]
    n_ph = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if n_ph and isinstance(raw_images, list) and n_ph != len(raw_images):
        add("prompt" if isinstance(prompt, str) else "messages",
            f"has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(raw_images)} image(s)")

    if len(problems) > n_before:
        return None
    meta = {k: v for k, v in obj.items() if k not in KNOWN_KEYS}
    return Record(id=rid, images=tuple(images), prompt=prompt, messages=parsed_messages,
                  answer=obj.get("answer"), capability=obj["capability"], line=lineno, meta=meta)


def load_records(path: str | Path, *, check_images: bool = True) -> list[Record]:
    """Parse and validate a JSONL dataset; raise ``DatasetError`` listing every problem.

    Blank lines are skipped. ``check_images=False`` skips the file checks of images (types are
    still checked), for when the images live elsewhere at load time.
    """
    path = Path(path)
    data = path.read_bytes()
    base = path.resolve().parent
    problems: list[Problem] = []
    records: list[Record] = []
    first_line: dict[str, int] = {}
    image_cache: dict[Path, str | None] = {}
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark some editors write
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(lineno, "line", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                                    f"at column {e.start + 1})"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            problems.append(Problem(lineno, "line", f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        except ValueError as e:  # NaN / Infinity, rejected by _reject_constant
            problems.append(Problem(lineno, "line", f"invalid JSON: {e}"))
            continue
        if isinstance(obj, dict) and _nonempty_str(obj.get("id")):
            rid = obj["id"]
            if rid in first_line:
                problems.append(Problem(lineno, "id", f"duplicate id {rid!r} (first on line {first_line[rid]})"))
            else:
                first_line[rid] = lineno
        rec = _parse_record(obj, lineno, base, check_images, image_cache, problems)
        if rec is not None:
            records.append(rec)
    if not records and not problems:
        problems.append(Problem(None, "file", "no records (empty file)"))
    if problems:
        raise DatasetError(path, problems)
    return records


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _canonical(rec: Record, image_hash: dict[Path, str]) -> str:
    body = {
        "id": rec.id,
        "prompt": rec.prompt,
        "messages": None if rec.messages is None else [list(m) for m in rec.messages],
        "answer": rec.answer,
        "capability": rec.capability,
        "meta": dict(rec.meta),
        "images": [image_hash[p] for p in rec.images],
    }
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dataset_fingerprint(records: Iterable[Record]) -> str:
    """sha256 hex digest of what the samples *are*: text fields, metadata and image bytes.

    Images enter by the sha256 of their bytes, not their path, and records are sorted by id
    (ids are unique; the canonical text breaks ties), with no line numbers. So moving or
    copying the dataset folder, renaming image files or reordering lines keeps the fingerprint,
    and cached teacher outputs (keyed by sample id) stay valid; changing any image byte, any
    text or any metadata value changes it and invalidates the cache.
    """
    return fingerprint_and_hashes(records)[0]


def fingerprint_and_hashes(records: Iterable[Record]) -> tuple[str, list[str]]:
    """``dataset_fingerprint`` and each record's content hash (in record order), images hashed once.

    A record's content hash is the first 32 hex digits of the sha256 of its canonical text (the
    line the fingerprint hashes: id, text, metadata, image bytes' sha256). A cache stores it per
    sample (``content_hash``), so a build of a grown dataset reuses exactly the unchanged samples.
    """
    recs = list(records)
    image_hash: dict[Path, str] = {}
    for rec in recs:
        for p in rec.images:
            if p not in image_hash:
                image_hash[p] = _file_sha256(p)
    canon = [_canonical(rec, image_hash) for rec in recs]
    h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for _, text in sorted(zip((r.id for r in recs), canon)):
        h.update(text.encode("utf-8") + b"\n")
    return h.hexdigest(), [hashlib.sha256(text.encode("utf-8")).hexdigest()[:32] for text in canon]
