"""Stage-one dataset format: every validation error names file, line and field; the fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kd.pipeline.common.dataset import DatasetError, Record, dataset_fingerprint, load_image, load_records


def _png(path: Path, colour=(255, 0, 0), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _rec(rid: str = "a", **kw) -> dict:
    r = {"id": rid, "images": ["img/a.png"], "prompt": "What colour?", "answer": "red",
         "capability": "perception"}
    r.update(kw)
    return r


def _write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "a.png", (255, 0, 0))
    _png(tmp_path / "img" / "sub" / "b.png", (0, 0, 255))
    return tmp_path


def _errors(path: Path, **kw) -> str:
    with pytest.raises(DatasetError) as ei:
        load_records(path, **kw)
    assert isinstance(ei.value, ValueError)
    return str(ei.value)


def _assert_names(msg: str, path: Path, line: int, fld: str, text: str = "") -> None:
    hit = [m for m in msg.splitlines() if m.strip().startswith(f"{path}:{line}: {fld}")]
    assert hit, f"no error for line {line}, field {fld!r} in:\n{msg}"
    assert text in hit[0], hit[0]


def test_valid_records_parse(ds: Path):
    rows = [
        _rec("a", split="train", extra={"k": 1}),
        _rec("b", images=["img/sub/b.png", "img/a.png"], prompt=None,
             messages=[{"role": "system", "content": "drive"}, {"role": "user", "content": "Go?"}]),
        _rec("c", images=[], capability="planning"),
    ]
    path = _write(ds / "d.jsonl", rows[:1] + [""] + rows[1:])  # a blank line is skipped
    recs = load_records(path)
    assert [r.id for r in recs] == ["a", "b", "c"]
    assert [r.line for r in recs] == [1, 3, 4]
    a, b, c = recs
    assert a.images == ((ds / "img" / "a.png").resolve(),) and all(p.is_absolute() for p in b.images)
    assert a.meta == {"split": "train", "extra": {"k": 1}} and a.prompt == "What colour?" and a.messages is None
    assert b.prompt is None and b.messages == (("system", "drive"), ("user", "Go?"))
    assert b.prompt_or_messages == [{"role": "system", "content": "drive"}, {"role": "user", "content": "Go?"}]
    assert c.images == () and c.capability == "planning"
    assert a.as_dict()["images"] == [str(a.images[0])] and a.as_dict()["split"] == "train"
    hash(a)  # frozen and hashable despite the metadata dict


def test_absolute_and_parent_relative_paths(ds: Path):
    sub = ds / "data"
    sub.mkdir()
    path = _write(sub / "d.jsonl", [_rec("a", images=["../img/a.png", str(ds / "img" / "sub" / "b.png")])])
    (rec,) = load_records(path)
    assert rec.images == ((ds / "img/a.png").resolve(), (ds / "img/sub/b.png").resolve())


def test_bad_json_and_non_object(ds: Path):
    path = _write(ds / "d.jsonl", [_rec("a"), '{"id": "b", oops}', "[1, 2]", '{"id": "n", "x": NaN}'])
    msg = _errors(path)
    _assert_names(msg, path, 2, "line", "invalid JSON")
    _assert_names(msg, path, 3, "record", "JSON object")
    _assert_names(msg, path, 4, "line", "NaN")
    assert f"{path}:1:" not in msg


def test_non_utf8_line(ds: Path):
    path = ds / "d.jsonl"
    path.write_bytes(json.dumps(_rec("a")).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    _assert_names(_errors(path), path, 2, "line", "UTF-8")


@pytest.mark.parametrize("fld", ["id", "answer", "capability"])
def test_missing_field(ds: Path, fld: str):
    bad = _rec("b")
    del bad[fld]
    path = _write(ds / "d.jsonl", [_rec("a"), bad])
    _assert_names(_errors(path), path, 2, fld, "missing")


@pytest.mark.parametrize("absent", ["missing", None])
def test_images_are_optional_for_text_only_records(ds: Path, absent):
    text = _rec("b")
    if absent == "missing":
        del text["images"]
    else:
        text["images"] = None
    path = _write(ds / "d.jsonl", [_rec("a"), text])
    rec = load_records(path)[1]
    assert rec.images == ()
    same = _write(ds / "e.jsonl", [_rec("a"), {**text, "images": []}])
    assert dataset_fingerprint(load_records(path)) == dataset_fingerprint(load_records(same))


@pytest.mark.parametrize("fld,value,text", [
    ("id", 7, "non-empty string"),
    ("id", "", "non-empty string"),
    ("answer", ["red"], "wrong type list"),
    ("capability", None, "wrong type null"),
    ("images", "img/a.png", "list of paths"),
    ("images[0]", 3, "non-empty path string"),
    ("prompt", 5, "non-empty string"),
    ("messages", "hi", "non-empty list"),
    ("messages[0].role", "robot", "one of"),
    ("messages[0].content", 1, "must be a string"),
])
def test_wrong_type(ds: Path, fld: str, value, text: str):
    bad = _rec("b")
    if fld == "images[0]":
        bad["images"] = [value]
    elif fld.startswith("messages["):
        key = fld.split(".")[1]
        bad.pop("prompt")
        bad["messages"] = [{"role": "user", "content": "q", key: value}]
    elif fld == "messages":
        bad.pop("prompt")
        bad["messages"] = value
    else:
        bad[fld] = value
    path = _write(ds / "d.jsonl", [_rec("a"), bad])
    _assert_names(_errors(path), path, 2, fld, text)


@pytest.mark.parametrize("value", ["", "   \n"])
def test_empty_answer(ds: Path, value: str):
    path = _write(ds / "d.jsonl", [_rec("a", answer=value)])
    _assert_names(_errors(path), path, 1, "answer", "empty")


def test_duplicate_id_names_both_lines(ds: Path):
    path = _write(ds / "d.jsonl", [_rec("a"), _rec("b"), _rec("a")])
    msg = _errors(path)
    _assert_names(msg, path, 3, "id", "duplicate id 'a' (first on line 1)")


def test_prompt_and_messages(ds: Path):
    both = _rec("b", messages=[{"role": "user", "content": "q"}])
    neither = _rec("c")
    del neither["prompt"]
    ends_assistant = _rec("d", prompt=None, messages=[{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}])
    late_system = _rec("e", prompt=None, messages=[{"role": "user", "content": "q"},
                                                    {"role": "system", "content": "s"},
                                                    {"role": "user", "content": "q"}])
    path = _write(ds / "d.jsonl", [_rec("a"), both, neither, ends_assistant, late_system])
    msg = _errors(path)
    _assert_names(msg, path, 2, "prompt/messages", "not both")
    _assert_names(msg, path, 3, "prompt/messages", "missing")
    _assert_names(msg, path, 4, "messages[1].role", "last turn must be 'user'")
    _assert_names(msg, path, 5, "messages[1].role", "system")


def test_image_placeholder_count(ds: Path):
    path = _write(ds / "d.jsonl", [_rec("a", prompt="<image> and <image>?")])
    _assert_names(_errors(path), path, 1, "prompt", "2 <image> placeholder(s) but 1 image(s)")


def test_image_problems(ds: Path):
    (ds / "img" / "empty.png").write_bytes(b"")
    (ds / "img" / "junk.png").write_bytes(b"this is not an image")
    good = (ds / "img" / "a.png").read_bytes()
    (ds / "img" / "corrupt.png").write_bytes(good[:40] + bytes([good[40] ^ 0xFF]) + good[41:])
    rows = [_rec("a", images=["img/missing.png"]), _rec("b", images=["img/a.png", "img/empty.png"]),
            _rec("c", images=["img/junk.png"]), _rec("d", images=["img"]), _rec("e", images=["img/corrupt.png"])]
    path = _write(ds / "d.jsonl", rows)
    msg = _errors(path)
    _assert_names(msg, path, 1, "images[0]", "not found")
    _assert_names(msg, path, 2, "images[1]", "empty (0 bytes)")
    _assert_names(msg, path, 3, "images[0]", "unreadable image")
    _assert_names(msg, path, 4, "images[0]", "not a file")
    _assert_names(msg, path, 5, "images[0]", "unreadable image")
    assert f"{path}:2: images[0]" not in msg
    # Without image checks only the structure is validated.
    assert [r.id for r in load_records(path, check_images=False)] == list("abcde")


def test_all_problems_collected_and_capped(ds: Path):
    rows = [_rec(f"r{i}", answer="") for i in range(30)]
    path = _write(ds / "d.jsonl", rows)
    msg = _errors(path)
    assert msg.startswith(f"30 problem(s) in dataset {path}")
    assert "... and 10 more" in msg
    assert len([m for m in msg.splitlines() if ": answer:" in m]) == 20


def test_empty_file(ds: Path):
    path = ds / "d.jsonl"
    path.write_text("\n\n")
    assert "no records" in _errors(path)


def test_load_image_rgb(ds: Path):
    Image.new("L", (5, 3), 128).save(ds / "g.png")
    im = load_image(ds / "g.png")
    assert im.mode == "RGB" and im.size == (5, 3) and im.getpixel((0, 0)) == (128, 128, 128)


def _fp(path: Path) -> str:
    return dataset_fingerprint(load_records(path))


def test_fingerprint(ds: Path):
    rows = [_rec("a", split="train"), _rec("b", images=["img/sub/b.png"], answer="blue"), _rec("c", images=[])]
    base = _fp(_write(ds / "d.jsonl", rows))
    assert len(base) == 64 and base == _fp(ds / "d.jsonl")

    # Same content, other line order: same fingerprint.
    assert _fp(_write(ds / "r.jsonl", rows[::-1] + [""])) == base
    # Moved folder: same fingerprint.
    moved = ds.parent / (ds.name + "_moved")
    shutil.copytree(ds, moved)
    assert _fp(moved / "d.jsonl") == base
    # Renamed image file, same bytes: same fingerprint (content, not path).
    (moved / "img" / "sub" / "b.png").rename(moved / "img" / "b2.png")
    rows2 = [rows[0], {**rows[1], "images": ["img/b2.png"]}, rows[2]]
    assert _fp(_write(moved / "d.jsonl", rows2)) == base

    # Any content change changes it.
    assert _fp(_write(ds / "x.jsonl", [rows[0], {**rows[1], "answer": "red"}, rows[2]])) != base
    assert _fp(_write(ds / "x.jsonl", [{**rows[0], "split": "val"}, *rows[1:]])) != base
    assert _fp(_write(ds / "x.jsonl", [{**rows[0], "capability": "planning"}, *rows[1:]])) != base
    assert _fp(_write(ds / "x.jsonl", rows[:2])) != base
    img = ds / "img" / "a.png"
    data = bytearray(img.read_bytes())
    data[-20] ^= 0x01  # one byte inside the PNG's IEND/IDAT tail
    img.write_bytes(bytes(data))
    assert dataset_fingerprint(load_records(ds / "d.jsonl", check_images=False)) != base


def test_fingerprint_image_order_and_records_directly(ds: Path):
    a, b = str(ds / "img/a.png"), str(ds / "img/sub/b.png")
    r1 = Record("x", (Path(a), Path(b)), "p", None, "y", "perception", 1)
    r2 = Record("x", (Path(b), Path(a)), "p", None, "y", "perception", 1)
    assert dataset_fingerprint([r1]) != dataset_fingerprint([r2])
    assert dataset_fingerprint([r1]) == dataset_fingerprint([Record("x", r1.images, "p", None, "y", "perception", 99)])


# ------------------------------------------------------------------------------ RecordTable


def test_record_table_gives_back_every_record_exactly(ds: Path):
    from kd.pipeline.common.dataset import RecordTable

    rows = [
        _rec("a", split="train", extra={"k": 1, "nested": [1.5, None, "x"]}),
        _rec("b", images=["img/sub/b.png", "img/a.png"], prompt=None,
             messages=[{"role": "system", "content": "drive"}, {"role": "user", "content": "Go? ünï"}]),
        _rec("c", images=[], capability="planning"),
        _rec("d", answer="ünïcode \n answer"),
    ]
    records = load_records(_write(ds / "d.jsonl", rows))
    table = RecordTable(records)
    assert len(table) == 4 and list(table) == records
    assert table[1] == records[1] and table[-1] == records[-1] and table[1:3] == records[1:3]
    assert table.take([3, 0, 3, -4]) == [records[3], records[0], records[3], records[0]]
    assert table[0].meta == {"split": "train", "extra": {"k": 1, "nested": [1.5, None, "x"]}}
    assert table[1].messages == records[1].messages and table[1].prompt is None
    assert table[2].images == () and all(isinstance(p, Path) for p in table[1].images)
    assert table.capabilities() == [r.capability for r in records]
    for bad in (4, -5):
        with pytest.raises(IndexError, match="out of range"):
            table.take([0, bad])
    empty = RecordTable(iter([]))
    assert len(empty) == 0 and empty.take([]) == [] and list(empty) == [] and empty.capabilities() == []
    assert list(RecordTable(iter(records))) == records  # any iterable, read once


def test_record_table_keeps_no_python_object_per_record():
    """One numpy buffer, not ~0.7 KB of Python objects per record (which loader workers would copy)."""
    import gc
    import tracemalloc
    import weakref

    from kd.pipeline.common.dataset import RecordTable

    n = 20_000
    records = [Record(id=f"scene-{i:06d}", images=(Path(f"/data/{i:06d}.png"),), prompt="What is ahead?",
                      messages=None, answer="a car", capability="perception", line=i + 1, meta={"split": "train"})
               for i in range(n)]
    for r in records:
        str(r.images[0])  # a Path caches its string on first use: the records' memory, not the table's
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        table = RecordTable(records)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert table[n - 1] == records[n - 1]
    blocks = sum(stat.count_diff for stat in after.compare_to(before, "filename"))
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert blocks < 100, f"{blocks} allocations for {n} records: a Python object per record"
    assert held < 160 * n, f"{held / n:.0f} bytes per record"
    first = weakref.ref(records[0])
    del records
    gc.collect()
    assert first() is None, "the table keeps the Records it was built from alive"
