"""`kd cache ls` / `kd cache inspect` at 80 columns: whole names next to their role, filters,
order by creation time, full hashes in --json only (issue 21).

Caches come from ``cache_helpers.build_cache`` (no teacher runs); role and creation time are
set in the manifest afterwards, as `kd cache build` would have written them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest
from cache_helpers import build_cache, make_signals, read_manifest, write_manifest
from rich.console import Console
from typer.testing import CliRunner

from kd.cache_schema import SignalConfig
from kd.cache_schema.inspection import compare, inspect_summary
from kd.cache_schema.listing import (DROP_ORDER, CacheEntry, Filters, by_created, cells, created_minute,
                                     fit_columns, human_bytes, signals_compact)
from kd.cache_schema.reader import CacheReader
from kd.cache_schema.summary import list_caches, scan
from kd.cli import app
from kd.cli_render import render_inspect, render_ls

runner = CliRunner()

RECORDS = [{"id": f"s-{i}", "images": [], "prompt": f"question {i}?", "answer": "stop", "capability": "planning"} for i in range(4)]
# (teacher, role, signals, created): created out of name order, so sorting by name would fail the order test
SPECS = [
    ("Qwen2.5-VL-7B-Instruct", "reasoning",
     SignalConfig(top_k=16, hidden_layers=(2,), attention_layers=(1, 2), attention_kinds=("full",)), "2026-01-03T10:07:59+00:00"),
    ("Org/Teacher-7B", "perception", SignalConfig(top_k=16, attention_layers=(0,), attention_kinds=("t2v",)),
     "2026-01-01T08:00:00+00:00"),
    ("demo-teacher", "planning", SignalConfig(top_k=64, value_coding="u8"), "2026-01-02T23:59:30+00:00"),
]


def _fingerprint_of_records(path: Path) -> str:
    from kd.pipeline.common.dataset import dataset_fingerprint, load_records

    return dataset_fingerprint(load_records(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three sealed caches (two datasets) and one unfinished build under one root."""
    base = tmp_path_factory.mktemp("listing")
    data = base / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    fp_file = _fingerprint_of_records(data)
    fp_other = hashlib.sha256(b"another dataset").hexdigest()
    root = base / "caches"
    caches = {}
    for i, (teacher, role, sig, created) in enumerate(SPECS):
        samples = [make_signals(f"s-{j}", 5, sig, seed=j) for j in range(4)]
        dataset = fp_file if i != 1 else fp_other
        build = build_cache(str(root), samples, sig, teacher=teacher, dataset=dataset)
        doc = read_manifest(build.location.path)
        doc["teacher"]["role"], doc["created"] = role, created
        write_manifest(build.location.path, doc)
        caches[role] = {"name": build.name, "path": build.location.path, "key": build.key, "dataset": dataset}
    sig = SignalConfig(top_k=8)
    unfinished = build_cache(str(root), [make_signals(f"s-{j}", 5, sig, seed=j) for j in range(4)], sig,
                             teacher="half-built", commit_shards=[0], seal=False)
    return {"root": str(root), "data": str(data), "caches": caches, "unfinished": unfinished.name}


def kd(*args: str, columns: int = 80) -> str:
    """The command's stdout at a terminal width of ``columns``, trailing spaces of rich's cells removed."""
    res = runner.invoke(app, list(args), env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return "\n".join(lines_of(res.stdout)) + "\n"


def lines_of(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def test_ls_at_80_columns_puts_each_whole_name_next_to_its_role(world):
    out = kd("cache", "ls", world["root"])
    lines = lines_of(out)
    assert all(len(line) <= 80 for line in lines), out
    for role, c in world["caches"].items():
        assert any(re.match(rf"{re.escape(c['name'])}\s+{role}\b", line) for line in lines), (c["name"], out)
    assert "…" not in out
    # Hashes only in --long / --json: no 64-hex key, not even its 16-char prefix past the name's own.
    for c in world["caches"].values():
        assert c["key"] not in out and c["dataset"][:12] not in out


def test_the_terminal_width_really_applies(world):
    narrow, wide = kd("cache", "ls", world["root"], columns=80), kd("cache", "ls", world["root"], columns=200)
    header_narrow, header_wide = lines_of(narrow)[0].split(), lines_of(wide)[0].split()
    assert header_wide == ["name", "role", "signals", "samples", "tokens", "size", "sealed", "created", "(UTC)"]
    assert "tokens" not in header_narrow and {"name", "role", "signals"} <= set(header_narrow)
    assert "not shown at 80 columns: sealed" in narrow and "not shown" not in wide
    assert "top16 fp16 · h[2] · attn full[1,2]" in wide and "2026-01-03 10:07" in wide


def test_ls_sorts_by_created_time_newest_last_unsealed_after(world):
    expected = [world["caches"][r]["name"] for r in ("perception", "planning", "reasoning")] + [world["unfinished"]]
    listed = json.loads(kd("cache", "ls", world["root"], "--json"))
    assert [c["name"] for c in listed] == expected
    out = kd("cache", "ls", world["root"], columns=200)
    starts = [next(i for i, line in enumerate(lines_of(out)) if line.startswith(name)) for name in expected]
    assert starts == sorted(starts)
    assert re.search(rf"{re.escape(world['unfinished'])}.*\bno\s+unsealed", out)


def test_ls_filters(world):
    caches = world["caches"]

    def names(*args: str) -> list[str]:
        return [c["name"] for c in json.loads(kd("cache", "ls", world["root"], "--json", *args))]

    assert names("--role", "PLANNING") == [caches["planning"]["name"]]
    assert names("--teacher", "qwen") == [caches["reasoning"]["name"]]
    assert names("--teacher", "org/teacher") == [caches["perception"]["name"]]
    other = caches["perception"]["dataset"]
    assert names("--dataset", other[:8]) == [caches["perception"]["name"]]
    # A dataset file is fingerprinted as `kd cache build` does (the unfinished build has another dataset).
    assert names("--dataset", world["data"]) == [caches[r]["name"] for r in ("planning", "reasoning")]
    assert names("--dataset", world["data"], "--role", "reasoning") == [caches["reasoning"]["name"]]
    table = kd("cache", "ls", world["root"], "--role", "reasoning")
    assert caches["reasoning"]["name"] in table and caches["planning"]["name"] not in table
    none = kd("cache", "ls", world["root"], "--role", "steering")
    assert "no cache under" in none and "--role steering" in none and "(4 there)" in none


def test_ls_refuses_a_dataset_that_is_neither_a_file_nor_hex(world):
    res = runner.invoke(app, ["cache", "ls", world["root"], "--dataset", "no-such.jsonl"])
    assert res.exit_code == 2 and "no-such.jsonl" in res.output and "hex" in res.output


def test_ls_json_and_long_keep_full_hashes(world):
    listed = {c["name"]: c for c in json.loads(kd("cache", "ls", world["root"], "--json"))}
    for role, c in world["caches"].items():
        got = listed[c["name"]]
        assert got["key"] == c["key"] and len(got["key"]) == 64 and got["dataset"] == c["dataset"]
        assert got["role"] == role and got["sealed"] and got["samples"] == 4 and got["bytes"] > 0
    assert listed[world["unfinished"]]["sealed"] is False and listed[world["unfinished"]]["error"] == "unfinished build"
    long = kd("cache", "ls", world["root"], "--long")
    assert all(len(line) <= 80 for line in lines_of(long))
    for c in world["caches"].values():
        assert re.search(rf"^\s+key\s+{c['key']}$", long, re.M) and re.search(rf"^\s+dataset\s+{c['dataset']}$", long, re.M)


def test_inspect_at_80_columns_groups_blocks_and_shortens_hashes(world):
    c = world["caches"]["reasoning"]
    console = Console(width=80, file=io.StringIO(), color_system=None)
    render_inspect([inspect_summary(CacheReader(c["path"]))], console)
    out = "\n".join(lines_of(console.file.getvalue())) + "\n"
    lines = lines_of(out)
    assert all(len(line) <= 80 for line in lines), out
    assert [line for line in lines if line and not line.startswith(" ")] == ["cache", "identity", "signals", "size"]
    assert c["key"] not in out and c["dataset"] not in out
    assert re.search(rf"^\s+key\s+{c['key'][:16]}…$", out, re.M)
    assert re.search(rf"^\s+dataset\s+{c['dataset'][:16]}…$", out, re.M)
    assert re.search(rf"^\s+name\s+{re.escape(c['name'])}$", out, re.M)
    assert re.search(r"^\s+role\s+reasoning$", out, re.M)
    assert re.search(r"^\s+attention\s+full, layers 1,2 \(fp16\)$", out, re.M)
    # The command prints the same at COLUMNS=80, and --json keeps every hash whole.
    assert kd("cache", "inspect", c["path"]) == out
    info = json.loads(kd("cache", "inspect", c["path"], "--json"))
    assert info["key"] == c["key"] and info["dataset_fingerprint"] == c["dataset"] and info["role"] == "reasoning"


def test_inspect_of_several_caches_names_each_path_and_what_differs(world):
    a, b = world["caches"]["perception"], world["caches"]["planning"]
    out = kd("cache", "inspect", a["path"], b["path"], columns=300)
    tail = out[out.index("compared (2 caches)"):]
    assert f"#1  {a['path']}" in re.sub(r" +", "  ", tail) and f"#2  {b['path']}" in re.sub(r" +", "  ", tail)
    assert re.search(r"^\s+signals\s+#1 top16 fp16 · attn t2v\[0\]$", tail, re.M)
    assert re.search(r"^\s+#2 top64 u8$", tail, re.M)
    assert re.search(r"^\s+same\s+engine, tokenizer, template, samples$", tail, re.M)
    both = json.loads(kd("cache", "inspect", a["path"], b["path"], "--json"))
    assert [s["path"] for s in both] == [a["path"], b["path"]]
    narrow = kd("cache", "inspect", a["path"], b["path"])
    assert all(len(line) <= 80 for line in lines_of(narrow))


def test_compare_needs_two_caches(world):
    with pytest.raises(ValueError, match="two"):
        compare([inspect_summary(CacheReader(world["caches"]["planning"]["path"]))])


def test_columns_drop_in_the_documented_order_and_the_name_stays_whole(world):
    entries = by_created(scan(world["root"]))
    longest = max(len(e.name) for e in entries)
    seen = []
    for width in range(220, 20, -1):
        layout = fit_columns(entries, width)
        assert layout.columns[0] == "name"
        assert layout.dropped() == DROP_ORDER[:len(layout.dropped())]  # a prefix of the documented order
        console = Console(width=width, file=io.StringIO(), color_system=None)
        render_ls(entries, console)
        out = console.file.getvalue()
        assert all(re.search(rf"^{re.escape(e.name)}", out, re.M) for e in entries)
        if width >= longest:
            table = [line for line in lines_of(out) if not line.startswith("(")]
            assert all(len(line) <= width for line in table), (width, out)
        seen.append(layout.dropped())
    assert seen[0] == () and seen[-1] == DROP_ORDER


def test_signals_compact_forms():
    assert signals_compact(SignalConfig(top_k=16, hidden_layers=(2,), attention_layers=(1, 2),
                                        attention_kinds=("full",)).to_dict()) == "top16 fp16 · h[2] · attn full[1,2]"
    assert signals_compact(SignalConfig(logits="sampled", top_k=12, sampled_draws=24, hidden_layers=(1, 3),
                                        hidden_coding="bf16").to_dict()) == "sampled12x24 fp16 · h[1,3] bf16"
    assert signals_compact(SignalConfig(top_k=4, attention_layers=(0,), attention_kinds=("t2v", "full"),
                                        attention_coding="fp32").to_dict()) == "top4 fp16 · attn t2v+full[0] fp32"
    assert signals_compact(None) == ""


def test_cells_formats():
    assert created_minute("2026-01-02T23:59:30+00:00") == "2026-01-02 23:59"
    assert created_minute("2026-01-02T23:59:30+02:00") == "2026-01-02 21:59"  # shown in UTC
    assert created_minute("not a time") == "not a time"
    assert [human_bytes(n) for n in (0, 999, 1000, 28_812, 1_234_567_890)] == ["0 B", "999 B", "1 kB", "28.8 kB", "1.23 GB"]
    row = cells(CacheEntry(name="x-1", path="/r/x-1", sealed=False, status="unfinished build"))
    assert row["sealed"] == "no" and row["created"] == "unsealed" and row["role"] == "-"


def test_filters_refuse_non_hex_dataset():
    with pytest.raises(ValueError, match="hex"):
        Filters(dataset="train.jsonl")
    assert not Filters().active() and Filters(role="x").describe() == "--role x"


def test_help_documents_the_drop_order_in_use():
    res = runner.invoke(app, ["cache", "ls", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and f"drops columns in this order: {', '.join(DROP_ORDER)}." in text
    for option in ("--long", "--json", "--teacher", "--role", "--dataset"):
        assert option in text


def test_an_unreadable_manifest_is_listed_with_its_error(world, tmp_path):
    import shutil

    c = world["caches"]["planning"]
    broken = tmp_path / "root" / c["name"]
    shutil.copytree(c["path"], broken)
    (broken / "manifest.json").write_text('{"format": "something else"}')
    out = kd("cache", "ls", str(tmp_path / "root"))
    assert re.search(rf"^{re.escape(c['name'])}\s+-\s+unreadable$", out, re.M), out
    assert f"{c['name']}: {broken}/manifest.json: not a kd cache manifest" in out
    listed = json.loads(kd("cache", "ls", str(tmp_path / "root"), "--json"))
    assert listed[0]["sealed"] is False and "not a kd cache manifest" in listed[0]["error"]


def test_list_caches_keeps_its_flat_rows_over_the_same_walk(world, tmp_path):
    """`list_caches` (the library's older rows) reads what `scan` reads: a child cache's own samples
    and tokens (not its parent chain's, which `kd cache ls` shows), and for an unfinished build only
    that it is unfinished, also when its plan cannot be read."""
    import shutil

    root = tmp_path / "root"
    planning, reasoning = world["caches"]["planning"], world["caches"]["reasoning"]
    for c in (planning, reasoning):
        shutil.copytree(c["path"], root / c["name"])
    doc = read_manifest(root / reasoning["name"])
    own_tokens = doc["counts"]["tokens"]
    doc["parent"] = {"name": planning["name"], "key": planning["key"], "samples": 20, "tokens": 77, "dropped": None}
    write_manifest(root / reasoning["name"], doc)
    shutil.copytree(Path(world["root"]) / world["unfinished"], root / world["unfinished"])
    (root / world["unfinished"] / "plan.json").write_text("not json")
    (root / "not-a-cache").mkdir()

    entries = {e.name: e for e in scan(str(root))}
    rows = {r["name"]: r for r in list_caches(str(root))}
    assert list(rows) == list(entries) == sorted([planning["name"], reasoning["name"], world["unfinished"]])
    child = rows[reasoning["name"]]
    assert list(child) == ["path", "name", "key", "teacher", "dataset", "samples", "tokens", "bytes", "sealed", "created"]
    assert child["samples"] == 4 and child["tokens"] == own_tokens and child["key"] == reasoning["key"]
    assert child["teacher"] == "Qwen2.5-VL-7B-Instruct" and child["dataset"] == reasoning["dataset"]
    assert child["bytes"] == entries[reasoning["name"]].bytes > 0 and child["created"] == "2026-01-03T10:07:59+00:00"
    assert entries[reasoning["name"]].samples == 24 and entries[reasoning["name"]].tokens == own_tokens + 77
    assert rows[planning["name"]]["samples"] == 4 and rows[planning["name"]]["sealed"] is True
    assert entries[world["unfinished"]].status == "unfinished build (plan.json unreadable)"
    assert rows[world["unfinished"]] == {"path": str(root / world["unfinished"]), "name": world["unfinished"],
                                         "sealed": False, "error": "unfinished build"}
    (root / planning["name"] / "manifest.json").write_text('{"format": "something else"}')
    broken = {r["name"]: r for r in list_caches(str(root))}[planning["name"]]
    assert broken["sealed"] is False and "not a kd cache manifest" in broken["error"] and len(broken) == 4
