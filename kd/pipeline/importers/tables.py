"""Tabular datasets to kd records: Parquet files, or a ``datasets.load_from_disk`` folder (``hf``).

One row is one record. Columns are named by options, with defaults that match kd's own field
names (``id``, ``prompt`` | ``messages``, ``answer``, ``images`` or ``image``, ``capability``):

* id: ``id_column``; without one (and no ``id`` column) the row's position,
  ``<file>-<row>`` or ``<split>-<row>``: stable for an unchanged file.
* prompt: ``prompt_column`` (a string), or ``messages_column`` (a list of ``{role, content}``, or
  the same as a JSON string; the turns before the answer, last one ``user``).
* answer: ``answer_column``. A table of ``messages`` without an ``answer`` column (and no
  ``answer_column`` named) holds conversations: each row's turns end with an assistant turn, and
  the record supervises every assistant turn (kd's multi-turn record).
* images: ``image_column``, one value or a list; each value is image bytes, a
  ``{"bytes", "path"}`` struct (how a Hugging Face ``Image`` feature stores pictures) or a path.
  Bytes are checked and written to ``OUT/images/`` under content-hashed names; paths resolve
  against ``images_root`` (default: the Parquet file's folder, or the dataset folder).
* capability: ``capability_column``, or one ``capability`` tag for every row (default: the
  ``capability`` column if there is one, else ``general``).

Every other column is kept as metadata when its values are JSON (binary columns are dropped).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import ImagePaths, ImportResult, Problems, Staging, nonempty_str, type_name

ROLES = ("system", "user", "assistant")
BATCH_ROWS = 1024


@dataclass(frozen=True)
class Columns:
    """Which column holds what (None: take the default named in the module docstring)."""

    id: str | None = None
    prompt: str | None = None
    messages: str | None = None
    answer: str = "answer"
    image: str | None = None
    capability_column: str | None = None
    capability: str | None = None


@dataclass(frozen=True)
class _Plan:
    id: str | None
    text: str
    is_messages: bool
    answer: str | None  # None: conversations, every assistant turn supervised
    image: str | None
    capability_column: str | None
    capability: str


def _plan(cols: Columns, names: Sequence[str], source: str, problems: Problems) -> _Plan | None:
    """Resolve ``cols`` against the table's column names; one problem per missing column."""
    have = set(names)
    missing: list[tuple[str, str]] = []

    def need(option: str, name: str | None) -> None:
        if name is not None and name not in have:
            missing.append((option, name))

    if cols.prompt and cols.messages:
        raise ValueError("give --prompt-column or --messages-column, not both")
    if cols.capability and cols.capability_column:
        raise ValueError("give --capability or --capability-column, not both")
    text, is_messages = cols.prompt or cols.messages, bool(cols.messages)
    if text is None:
        text, is_messages = ("prompt", False) if "prompt" in have else ("messages", True)
    conversations = is_messages and cols.answer == "answer" and "answer" not in have
    need("--id-column", cols.id)
    need("--prompt-column", cols.prompt)
    need("--messages-column", cols.messages)
    need("--answer-column", None if conversations else cols.answer)
    need("--image-column", cols.image)
    need("--capability-column", cols.capability_column)
    if text not in have and not (cols.prompt or cols.messages):
        missing.append(("--prompt-column or --messages-column", "prompt"))
    for option, name in missing:
        problems.add(source, "", option, f"no column {name!r} (columns: {list(names)})")
    if missing:
        return None
    image = cols.image or next((c for c in ("images", "image") if c in have), None)
    cap_col = cols.capability_column or ("capability" if cols.capability is None and "capability" in have else None)
    rid = cols.id or ("id" if "id" in have else None)
    return _Plan(rid, text, is_messages, None if conversations else cols.answer, image, cap_col,
                 cols.capability or "general")


def _jsonable(value: Any) -> Any:
    """``value`` as JSON (NaN -> null, other objects as text); raises TypeError on binary data."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("binary")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # dates, decimals: their text


def _messages(value: Any, fld: str, add, conversation: bool = False) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            add(fld, f"a string value must be JSON turns: {e.msg}")
            return None
    if not isinstance(value, (list, tuple)) or not value:
        add(fld, f"must be a non-empty list of {{role, content}}, got {type_name(value)}")
        return None
    out: list[dict[str, str]] = []
    for i, m in enumerate(value):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES or not isinstance(content, str):
            add(f"{fld}[{i}]", f"must be {{role: system|user|assistant, content: str}}, got {m!r}")
            return None
        if role == "system" and i:
            add(f"{fld}[{i}].role", "a system turn may only come first")
            return None
        out.append({"role": role, "content": content})
    last = "assistant" if conversation else "user"
    if out[-1]["role"] != last:
        why = ("a conversation ends with the assistant turn it supervises" if conversation
               else "the answer is the next turn")
        add(f"{fld}[{len(out) - 1}].role", f"last turn must be {last!r} ({why}), got {out[-1]['role']!r}")
        return None
    empty = [i for i, m in enumerate(out) if conversation and m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        add(f"{fld}[{empty[0]}].content", "empty assistant turn (a supervised turn must be non-empty)")
        return None
    return out


def _images(value: Any, fld: str, add, paths: ImagePaths, staging: Staging) -> list[str] | None:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for i, item in enumerate(items):
        f = f"{fld}[{i}]" if isinstance(value, (list, tuple)) else fld
        if isinstance(item, dict):
            if item.get("bytes") is not None:
                item = item["bytes"]
            elif item.get("path") is not None:
                item = item["path"]
            else:
                add(f, "an image struct with neither bytes nor path")
                continue
        if isinstance(item, str):
            p, err = paths.resolve(item)
            got = str(p) if p else None
        else:
            got, err = staging.add_image_bytes(item)
        if err:
            add(f, err)
        else:
            out.append(got)
    return out if len(out) == len(items) else None


def _rows(plan: _Plan, rows: Iterator[tuple[int, dict]], source: str, id_prefix: str, paths: ImagePaths,
          problems: Problems, staging: Staging) -> None:
    used = {plan.id, plan.text, plan.answer, plan.image, plan.capability_column}
    for row, values in rows:
        where = f"row {row}"
        rid = values.get(plan.id) if plan.id else f"{id_prefix}-{row}"
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if nonempty_str(rid):
            where = f"row {row} (id {rid})"
        n_before = problems.total

        def add(fld: str, msg: str) -> None:
            problems.add(source, where, fld, msg)

        if not nonempty_str(rid):
            add(plan.id or "id", f"must be a non-empty string, got {rid!r}")
        elif (first := staging.claim_id(rid, f"{source} {where}")) is not None:  # bad rows count too
            add(plan.id or "id", f"duplicate id {rid!r} (first at {first})")
        text = values.get(plan.text)
        if plan.is_messages:
            prompt = _messages(text, plan.text, add, conversation=plan.answer is None)
        elif not nonempty_str(text):
            add(plan.text, f"must be a non-empty string, got {text!r}")
        answer = values.get(plan.answer) if plan.answer else None
        if plan.answer and not nonempty_str(answer):
            add(plan.answer, f"must be a non-empty string, got {answer!r}")
        cap = values.get(plan.capability_column) if plan.capability_column else plan.capability
        if not nonempty_str(cap):
            add(plan.capability_column or "capability", f"must be a non-empty string, got {cap!r}")
        images = _images(values.get(plan.image), plan.image, add, paths, staging) if plan.image else []
        if problems.total > n_before:
            continue
        rec: dict[str, Any] = {"id": rid, "images": images}
        rec["messages" if plan.is_messages else "prompt"] = prompt if plan.is_messages else text
        if plan.answer:
            rec["answer"] = answer
        rec["capability"] = cap
        for k, v in values.items():
            if k not in used and k not in rec:
                try:
                    rec[k] = _jsonable(v)
                except TypeError:
                    pass  # binary columns are not metadata
        staging.add(rec)


def _parquet_files(src: Path) -> list[Path]:
    if src.is_dir():
        files = sorted(p for p in src.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no *.parquet files under {src}")
        return files
    if not src.exists():
        raise FileNotFoundError(f"parquet source not found: {src}")
    return [src]


def import_parquet(src: str | Path, out: str | Path, *, columns: Columns = Columns(),
                   images_root: str | Path | None = None, force: bool = False) -> ImportResult:
    """Convert a Parquet file, or every ``*.parquet`` under a folder, into ``out/data.jsonl``."""
    import pyarrow.parquet as pq

    source = Path(src).expanduser()
    files = _parquet_files(source)
    problems = Problems("parquet")
    with Staging(out, "parquet", force=force) as staging:
        for path in files:
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # ArrowInvalid and OSError: not a Parquet file, truncated
                problems.add(path, "", "file", f"not a readable Parquet file: {type(e).__name__}: {e}")
                continue
            plan = _plan(columns, pf.schema_arrow.names, str(path), problems)
            if plan is None:
                continue
            prefix = path.relative_to(source).with_suffix("").as_posix() if source.is_dir() else path.stem
            rows = ((i, r) for i, r in enumerate(r for b in pf.iter_batches(batch_size=BATCH_ROWS)
                                                 for r in b.to_pylist()))
            paths = ImagePaths(Path(images_root).expanduser() if images_root else path.resolve().parent)
            _rows(plan, rows, str(path), prefix, paths, problems, staging)
        return staging.commit(problems, {"source": str(source.resolve()), "columns": columns.__dict__,
                                         "files": [str(p.resolve()) for p in files]})


def import_hf(src: str | Path, out: str | Path, *, columns: Columns = Columns(), split: str | None = None,
              images_root: str | Path | None = None, force: bool = False) -> ImportResult:
    """Convert a ``datasets.load_from_disk`` folder (a Dataset, or one split of a DatasetDict)."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError("the hf format needs the `datasets` package: pip install 'kd[hf]'") from e
    source = Path(src).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"hf source must be a datasets.save_to_disk folder: {source}")
    try:
        ds = datasets.load_from_disk(str(source))
    except Exception as e:  # FileNotFoundError for a folder that is not a saved dataset, and others
        raise ValueError(f"{source}: not a datasets.load_from_disk folder: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{source} holds splits {list(ds)}: choose one with --split" if split is None
                             else f"{source} has no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"{source} is a single Dataset (no splits); drop --split {split}")
    label = f"{source}[{split}]" if split else str(source)
    problems = Problems("hf")
    with Staging(out, "hf", force=force) as staging:
        plan = _plan(columns, ds.column_names, label, problems)
        if plan is not None:
            table = ds.with_format("arrow")  # raw {"bytes", "path"} structs, not decoded PIL images
            rows = ((i, r) for i, r in enumerate(r for b in table.iter(batch_size=BATCH_ROWS) for r in b.to_pylist()))
            paths = ImagePaths(Path(images_root).expanduser() if images_root else source.resolve())
            _rows(plan, rows, label, split or "row", paths, problems, staging)
        return staging.commit(problems, {"source": str(source.resolve()), "split": split,
                                         "columns": columns.__dict__})
