"""LLaVA / ShareGPT conversations to kd records: one multi-turn record per conversation.

Source: a JSON list, or JSONL, of ``{"id", "image": path | [paths] (optional),
"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`` (``role``/``content``
keys and ``user``/``assistant`` names are read too).

A conversation becomes one record, id ``<id>``, whose ``messages`` (roles system / user /
assistant) end with its last gpt turn and that has no ``answer``: every assistant turn is
supervised in one sample (kd's multi-turn rule, ``kd.pipeline.common.encoding``), and the teacher
runs the conversation once.

A conversation whose images are not all shown before its first gpt turn (a placeholder in a later
human turn), or every conversation with ``split_turns=True``, gives instead one record per gpt
turn: ``<id>#<k>`` for its ``k``-th gpt turn (0-based), the turns before it as ``messages`` and
that turn's text as ``answer``; each record repeats the earlier turns as prompt.

``<image>`` placeholders stay where the source put them. A per-turn record gets the images whose
placeholders its ``messages`` hold (images are numbered in placeholder order): an image that
only a later human turn shows is not given to earlier answers. A conversation without any
placeholder gives every record all its images (kd's encoder puts them before the first user
text). Placeholders in the whole conversation must number exactly its images.

Refused (each named by file, entry and turn): a missing or duplicate id, a conversation that
starts with a gpt turn, two human or two gpt turns in a row, a system turn after the first,
one that ends with a human turn (nothing answers it), an empty answer, a placeholder count that
differs from the images, an image path that is missing or unreadable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd.pipeline.common.dataset import IMAGE_PLACEHOLDER

from .common import ImagePaths, ImportResult, Problems, Staging, nonempty_str, read_json, type_name

FORMAT = "llava"
ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
KNOWN_KEYS = frozenset({"id", "image", "images", "conversations", "capability"})


def _entries(source: Path, problems: Problems) -> Iterator[tuple[str, Any]]:
    """``(where, entry)`` for every entry: a JSON list (``[i]``) or JSONL (``line n``)."""
    try:
        head = source.read_bytes()[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as e:
        problems.add(source, "", "file", "not found" if isinstance(e, FileNotFoundError)
                     else f"unreadable: {type(e).__name__}: {e}")
        return
    if head.startswith(b"["):
        data = read_json(source, problems)
        if isinstance(data, list):
            yield from ((f"[{i}]", entry) for i, entry in enumerate(data))
        return
    with open(source, encoding="utf-8-sig") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    problems.add(source, f"line {n}", "line", f"invalid JSON: {e.msg} (column {e.colno})")
        except UnicodeDecodeError as e:
            problems.add(source, "", "file", f"not valid UTF-8: {e}")


def _turns(conv: Any, where: str, source: Path, problems: Problems) -> list[tuple[str, str]] | None:
    """The conversation as ``(role, text)`` with kd role names, checked turn by turn."""
    if not isinstance(conv, list) or not conv:
        problems.add(source, where, "conversations", f"must be a non-empty list of turns, got {type_name(conv)}"
                     if conv is not None else "missing")
        return None
    turns: list[tuple[str, str]] = []
    ok = True
    for t, turn in enumerate(conv):
        fld = f"conversations[{t}]"
        if not isinstance(turn, dict):
            problems.add(source, where, fld, f"must be an object {{from, value}}, got {type_name(turn)}")
            ok = False
            continue
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_NAMES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            problems.add(source, where, f"{fld}.from", f"must be one of system, human, gpt, got {speaker!r}")
            ok = False
        if not isinstance(text, str):
            problems.add(source, where, f"{fld}.value", f"must be a string, got {type_name(text)}")
            ok = False
        elif role == "assistant" and not text.strip():
            problems.add(source, where, f"{fld}.value", "empty gpt turn (an answer must be non-empty)")
            ok = False
        if role is None or not isinstance(text, str):
            continue
        prev = turns[-1][0] if turns else None
        if role == "system" and t != 0:
            problems.add(source, where, f"{fld}.from", "a system turn may only come first")
            ok = False
        elif role == "assistant" and prev in (None, "system"):
            problems.add(source, where, f"{fld}.from", "the conversation starts with a gpt turn "
                                                       "(the first non-system turn must be human)")
            ok = False
        elif role != "system" and role == prev:
            problems.add(source, where, f"{fld}.from", f"two {speaker} turns in a row (turns must alternate)")
            ok = False
        turns.append((role, text))
    if ok and turns[-1][0] != "assistant":
        problems.add(source, where, f"conversations[{len(turns) - 1}].from",
                     "the conversation ends with a human turn: nothing answers it (drop it or add the gpt turn)")
        ok = False
    return turns if ok else None


def _images(entry: dict, where: str, source: Path, paths: ImagePaths, problems: Problems) -> list[str] | None:
    key = "image" if "image" in entry else "images"
    raw = entry.get(key)
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        problems.add(source, where, key, f"must be a path or a list of paths, got {type_name(raw)}")
        return None
    out: list[str] = []
    for i, value in enumerate(items):
        p, err = paths.resolve(value)
        if err:
            problems.add(source, where, key if isinstance(raw, str) else f"{key}[{i}]", err)
        else:
            out.append(str(p))
    return out if len(out) == len(items) else None


def import_llava(src: str | Path, out: str | Path, *, images_root: str | Path | None = None,
                 capability: str = "general", split_turns: bool = False, force: bool = False) -> ImportResult:
    """Convert LLaVA / ShareGPT JSON or JSONL into ``out/data.jsonl`` (see the module docstring).

    ``capability`` tags every record, unless an entry carries its own ``capability`` field.
    """
    source = Path(src).expanduser()
    if not nonempty_str(capability):
        raise ValueError(f"capability must be a non-empty tag, got {capability!r}")
    paths = ImagePaths(Path(images_root).expanduser() if images_root else source.resolve().parent)
    problems = Problems(FORMAT)
    with Staging(out, FORMAT, force=force) as staging:
        for where, entry in _entries(source, problems):
            _entry(source, where, entry, capability, paths, problems, staging, split_turns)
        return staging.commit(problems, {"source": str(source.resolve()), "images_root": str(paths.root.resolve()),
                                         "capability": capability, "split_turns": split_turns})


def _entry(source: Path, where: str, entry: Any, capability: str, paths: ImagePaths, problems: Problems,
           staging: Staging, split_turns: bool) -> None:
    if not isinstance(entry, dict):
        problems.add(source, where, "", f"an entry must be an object {{id, image, conversations}}, "
                                        f"got {type_name(entry)}")
        return
    sid = entry.get("id")
    if isinstance(sid, int) and not isinstance(sid, bool):
        sid = str(sid)
    if not nonempty_str(sid):
        problems.add(source, where, "id", "missing" if "id" not in entry else f"must be a non-empty string, got {sid!r}")
        sid = None
    else:
        where = f"{where} (id {sid})"
        first = staging.claim_id(sid, where)  # before the checks: a bad entry's id still counts
        if first is not None:
            problems.add(source, where, "id", f"duplicate id {sid!r} (first at {first})")
            sid = None  # checked on, but gives no records
    cap = entry.get("capability", capability)
    if not nonempty_str(cap):
        problems.add(source, where, "capability", f"must be a non-empty string, got {cap!r}")
    turns = _turns(entry.get("conversations"), where, source, problems)
    images = _images(entry, where, source, paths, problems)
    if turns is None or images is None or sid is None or not nonempty_str(cap):
        return
    total = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if total and total != len(images):
        problems.add(source, where, "conversations", f"has {total} {IMAGE_PLACEHOLDER} placeholder(s) but "
                                                     f"{len(images)} image(s)")
        return
    meta = {k: v for k, v in entry.items() if k not in KNOWN_KEYS}
    first_answer = next(t for t, (role, _) in enumerate(turns) if role == "assistant")
    if not split_turns and sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns[:first_answer]) == total:
        staging.add({"id": sid, "images": images, "messages": [{"role": r, "content": c} for r, c in turns],
                     "capability": cap, **meta})
        return
    seen = 0  # placeholders in the turns before the current one
    k = 0
    for t, (role, text) in enumerate(turns):
        if role == "assistant":
            shown = images[:seen] if total else images
            first = staging.claim_id(f"{sid}#{k}", where)
            if first is not None:
                problems.add(source, where, "id", f"duplicate id {sid!r} (record {sid}#{k} first at {first})")
                return
            staging.add({"id": f"{sid}#{k}", "images": shown,
                         "messages": [{"role": r, "content": c} for r, c in turns[:t]], "answer": text,
                         "capability": cap, "source_id": sid, "turn": k, **meta})
            k += 1
        seen += text.count(IMAGE_PLACEHOLDER)
