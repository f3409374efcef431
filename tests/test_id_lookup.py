"""SampleIdIndex: the reader's sample id -> row lookup (hashes + the stored ids, no dict)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from kd.cache_schema import id_lookup
from kd.cache_schema.id_lookup import SampleIdIndex, StringColumn

IDS = ["scene-0-perception", "scene-0-reasoning", "", "ünïcode-id", "a" * 300, "scene-1-planning"]


def test_rows_of_present_absent_and_repeated_ids_in_query_order():
    index = SampleIdIndex(pa.array(IDS))
    query = ["scene-1-planning", "nope", "", "ünïcode-id", "scene-1-planning", "scene-0-perception ", "a" * 300]
    assert index.rows(query).tolist() == [5, -1, 2, 3, 5, -1, 4]
    assert index.rows([]).tolist() == []
    assert index.row("scene-0-reasoning") == 1 and index.row("x") == -1 and index.row(3) == -1  # type: ignore[arg-type]
    assert index.rows(["\udc80"]).tolist() == [-1]  # no valid UTF-8: absent, not an error


def test_a_chunked_column_and_an_empty_index():
    chunked = pa.chunked_array([IDS[:2], IDS[2:]])
    assert SampleIdIndex(chunked).rows(IDS).tolist() == list(range(len(IDS)))
    assert SampleIdIndex(pa.array([], pa.string())).rows(["a"]).tolist() == [-1]


def test_distinct_ids_sharing_a_digest_are_refused_not_served(monkeypatch):
    monkeypatch.setattr(id_lookup, "_digests", lambda ids: np.array([b"same" * 4] * len(ids), "S16"))
    with pytest.raises(ValueError, match="share an xxh3-128 digest"):
        SampleIdIndex(pa.array(["x", "y"])).duplicates()


def test_duplicates_are_reported():
    assert SampleIdIndex(pa.array(IDS)).duplicates() == []
    assert sorted(SampleIdIndex(pa.array(["a", "b", "a", "c", "b", "a"])).duplicates()) == ["a", "b"]


def test_the_index_holds_no_python_object_per_sample():
    """~24 bytes per sample (digest + order), not a dict entry and a str per id (~150 bytes each)."""
    n = 100_000
    ids = pa.array([f"scene-{i:07d}-perception" for i in range(n)])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = SampleIdIndex(ids)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert index.rows([f"scene-{n - 1:07d}-perception"]).tolist() == [n - 1]
    assert held < 32 * n, f"{held / n:.0f} bytes per sample"


@pytest.mark.parametrize("n", [1, 70_000])  # 70k: hashed in more than one batch
def test_every_id_finds_its_own_row(n):
    ids = [f"id-{i}" for i in range(n)]
    assert SampleIdIndex(pa.array(ids)).rows(ids).tolist() == list(range(n))


def test_string_columns_read_back_exactly_whatever_their_layout():
    hashes = [f"{i:032x}" for i in range(10)]  # one length: fixed-width bytes over the Arrow buffer
    caps = ["perception", "reasoning", "planning", "", "ünï"] * 2  # several lengths: dictionary codes
    odd = ["ab\x00", "cd\x00"] * 5  # one length, but S<width> would drop the trailing NUL
    for values in (hashes, caps, odd):
        rows = np.array([9, 0, 3, 3, 7])
        for column in (pa.array(values), pa.chunked_array([values[:4], values[4:]]), pa.array(["zz"] + values).slice(1)):
            assert StringColumn(column, "col").take(rows) == [values[r] for r in rows], (values, column)
    assert StringColumn(pa.array(hashes), "col")._fixed is not None  # the fast layout is the one used for hashes
    assert StringColumn(pa.array(odd), "col")._fixed is None
    with pytest.raises(ValueError, match="col: 1 null"):
        StringColumn(pa.array(["a", None]), "col")
