"""What every importer shares: problem collection, image checks and copies, the all-or-nothing output.

An import either writes a complete, valid ``OUT/data.jsonl`` (+ ``OUT/images/``) or nothing:
records and embedded images go to a staging folder beside ``OUT``, the staged JSONL is loaded
with ``kd.pipeline.common.dataset.load_records`` (the same validation a cache build runs), and
only then is the folder renamed to ``OUT``. A half-written dataset would otherwise look fine
until a teacher run hours later reads its missing tail.

Problems are collected, not raised one at a time, because fixing a 100k-entry export one error
per run is slow: an ``ImportFailed`` names every bad entry (source file, entry, field) up to
``MAX_KEPT``, and its message lists the first ``MAX_LISTED``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, UnidentifiedImageError

from kd.pipeline.common.dataset import DatasetError, check_image_file, load_records

MAX_LISTED = 20
MAX_KEPT = 1000
DATA_FILE = "data.jsonl"
IMAGES_DIR = "images"
MANIFEST_FILE = "import.json"
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


class SourceProblem(NamedTuple):
    """One bad entry: the source file, where in it (index / id / key path), the field, what is wrong."""

    source: str
    where: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.where}" if self.where else self.source
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ImportFailed(ValueError):
    """Every problem of one import (the first ``MAX_KEPT`` kept); nothing was written."""

    def __init__(self, fmt: str, problems: list[SourceProblem], total: int | None = None):
        self.format = fmt
        self.problems = problems
        self.total = len(problems) if total is None else total
        lines = [f"{self.total} problem(s) importing {fmt} data (nothing written):"]
        lines += [f"  {p}" for p in problems[:MAX_LISTED]]
        if self.total > MAX_LISTED:
            lines.append(f"  ... and {self.total - MAX_LISTED} more")
        super().__init__("\n".join(lines))


class Problems:
    """A collector: ``add`` as entries are read, ``raise_if_any`` once at the end."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.kept: list[SourceProblem] = []
        self.total = 0

    def add(self, source: str | Path, where: str, fld: str, message: str) -> None:
        self.total += 1
        if len(self.kept) < MAX_KEPT:
            self.kept.append(SourceProblem(str(source), where, fld, message))

    def __bool__(self) -> bool:
        return self.total > 0

    def raise_if_any(self) -> None:
        if self.total:
            raise ImportFailed(self.format, self.kept, self.total)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def read_json(path: Path, problems: Problems) -> Any:
    """The parsed JSON of ``path``, or None after adding a problem (missing, not UTF-8, bad JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        problems.add(path, "", "file", "not found")
    except (OSError, UnicodeDecodeError) as e:
        problems.add(path, "", "file", f"unreadable: {type(e).__name__}: {e}")
    except json.JSONDecodeError as e:
        problems.add(path, f"line {e.lineno}", "file", f"invalid JSON: {e.msg} (column {e.colno})")
    return None


def _verify(fp: Any) -> str:
    """PIL's format name of an image file or buffer, checked by ``verify`` (headers and checksums)."""
    with Image.open(fp) as im:
        fmt = im.format or "PNG"
        im.verify()
    return fmt


class ImagePaths:
    """Resolves image paths against a root and checks each file once (DriveLM frames share cameras)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._checked: dict[Path, str | None] = {}

    def resolve(self, value: Any) -> tuple[Path | None, str | None]:
        """``(absolute path, None)``, or ``(None, what is wrong)``."""
        if not nonempty_str(value) or "\x00" in value:
            return None, f"must be a non-empty path string, got {value!r}"
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else self.root / p).resolve()
        if p not in self._checked:
            self._checked[p] = check_image_file(p)
        return (None, self._checked[p]) if self._checked[p] else (p, None)


@dataclass
class ImportResult:
    """What an import wrote."""

    out: Path
    data: Path
    records: int
    images_written: int
    capabilities: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "data": str(self.data), "records": self.records,
                "images_written": self.images_written, "capabilities": self.capabilities}


class Staging:
    """The output being written: records and embedded images in a temporary folder beside ``out``.

    Use as a context manager: leaving it with an exception removes the folder; ``commit`` checks
    the staged dataset and renames it to ``out``. ``out`` must not exist (or be an empty folder)
    unless ``force``, which replaces it only once the new dataset is complete.
    """

    def __init__(self, out: str | Path, fmt: str, *, force: bool = False) -> None:
        self.out = Path(out).expanduser().absolute()
        self.format = fmt
        self.force = force
        if self.out.exists() and not force and (not self.out.is_dir() or any(self.out.iterdir())):
            raise FileExistsError(f"{self.out} already exists and is not empty (pass --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.importing-", dir=self.out.parent))
        self._jsonl = open(self.dir / DATA_FILE, "w", encoding="utf-8", newline="\n")
        self._ids: dict[str, str] = {}
        self._images: set[str] = set()
        self.capabilities: Counter[str] = Counter()
        self.records = 0

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def claim_id(self, rid: str, where: str) -> str | None:
        """None if ``rid`` is new (and remember ``where``), else where it was first seen."""
        if rid in self._ids:
            return self._ids[rid]
        self._ids[rid] = where
        return None

    def add(self, record: Mapping[str, Any]) -> None:
        """Append one record (a JSON object in kd's dataset format) to the staged JSONL."""
        self._jsonl.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self.capabilities[record["capability"]] += 1
        self.records += 1

    def add_image_bytes(self, data: Any) -> tuple[str | None, str | None]:
        """Store embedded image bytes as ``images/<sha256>.<ext>``: ``(relative path, None)`` or ``(None, error)``.

        Content-hashed names: the same picture in many rows is one file, and the dataset
        fingerprint (image bytes, not paths) is the same however often an export repeats it.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
            return None, f"image bytes must be non-empty bytes, got {type_name(data)}" + (
                " of length 0" if isinstance(data, (bytes, bytearray, memoryview)) else "")
        data = bytes(data)
        try:
            fmt = _verify(io.BytesIO(data))
        except UnidentifiedImageError:
            return None, f"image bytes are not a readable image ({len(data)} bytes starting {data[:8]!r}): " \
                         "no known image format"
        except Exception as e:  # truncated or corrupt data of a known format
            return None, f"image bytes are not a readable image ({len(data)} bytes): {type(e).__name__}: {e}"
        name = f"{hashlib.sha256(data).hexdigest()[:32]}.{_EXT.get(fmt, fmt.lower())}"
        if name not in self._images:
            (self.dir / IMAGES_DIR).mkdir(exist_ok=True)
            (self.dir / IMAGES_DIR / name).write_bytes(data)
            self._images.add(name)
        return f"{IMAGES_DIR}/{name}", None

    def commit(self, problems: Problems, manifest: Mapping[str, Any]) -> ImportResult:
        """Raise ``ImportFailed`` if anything was wrong, else validate, rename into place and report."""
        problems.raise_if_any()
        self._jsonl.close()
        if not self.records:
            problems.add(manifest.get("source", "?"), "", "source", "no records to import")
            problems.raise_if_any()
        try:
            load_records(self.dir / DATA_FILE)
        except DatasetError as e:  # an importer let through something kd's format refuses: a bug here
            raise ImportFailed(self.format, [SourceProblem(str(self.dir / DATA_FILE), f"line {p.line}", p.field,
                                                           p.message) for p in e.problems]) from e
        body = {**manifest, "format": self.format, "records": self.records,
                "capabilities": dict(sorted(self.capabilities.items())), "images_written": len(self._images)}
        (self.dir / MANIFEST_FILE).write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.replaced-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        if old is not None and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink(missing_ok=True)
        return ImportResult(self.out, self.out / DATA_FILE, self.records, len(self._images),
                            dict(sorted(self.capabilities.items())))
