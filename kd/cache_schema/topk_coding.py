"""A shard's top-k arrays from its teacher rows, as SPEC.md sections 5 and 6 define them.

The writer's one call for the token-level top-k signal: the value coding (``codecs``), the folding
of ``u8``, the frequency-rank id codes and their tie order (``id_coding``), for the layout of the
cache's ``schema_version``: 6 (what kd writes: uint16 codes + ``ids_hi``, the table as
differences, targets as their column in the row or else their code, tie groups sorted for every
16-bit coding, ``fp16`` / ``bf16`` tails in their dtype), 5 (the same with tie groups of ``u8``
only, targets as codes and float32 tails) or 2-4 (what tests write to check that old shards read).
After the table is built, rows are coded in blocks whose temporaries stay in the CPU's cache.
"""

from __future__ import annotations

import numpy as np

from .codecs import U8_FOLDED, U8_LEVELS, U8_PAD, encode_logprobs_codes
from .errors import CacheCorruptError
from .id_coding import (HI_FIELDS, ID_TABLE, IDS_HI, IdRanks, decode_ids, encode_ids, hi_planes, pack_high, sort_ties,
                        store_table)

V5 = 5  # the first schema_version with uint16 codes + ids_hi and targets coded through the table
V6 = 6  # the first with targets as row columns, 16-bit float tie order and tails (SPEC.md, Versioning)
_BLOCK_ROWS = 2048


def ties_sorted(coding: str, logits: str, schema_version: int) -> bool:
    """Whether a shard stores each tie group's id codes sorted, as differences (SPEC.md section 5):
    ``u8`` from schema_version 3, ``fp16`` / ``bf16`` top-k rows from 6 (sampled rows keep their
    order: their ``counts`` follow it)."""
    if coding == "u8":
        return schema_version >= 3
    return coding in ("fp16", "bf16") and logits == "topk" and schema_version >= V6


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, targets: np.ndarray, coding: str,
                schema_version: int = V6, logits: str = "topk") -> dict[str, np.ndarray]:
    """``target_ids``, ``ids`` (+ ``ids_hi``), ``id_table``, ``logprobs`` and ``tail_logmass`` of
    ``[N, k]`` rows sorted by descending log-prob (``u8``: folded entries' ids become -1)."""
    fold_code = U8_FOLDED if schema_version >= V5 else U8_PAD
    coded, codes = encode_logprobs_codes(logprobs, tail, coding, fold_code, tail_in_coding=schema_version >= V6)
    ids = np.asarray(ids, np.int32)
    targets = np.asarray(targets, np.int32)
    if coding == "u8":  # folded entries have no id (SPEC.md section 6)
        ids = np.where(codes >= U8_LEVELS, np.int32(-1), ids)
    sort = ties_sorted(coding, logits, schema_version)
    if schema_version < V5:
        id_codes, table = encode_ids(ids)
        if sort:
            id_codes, _ = sort_ties(id_codes, codes)
        return {"target_ids": targets, "ids": id_codes, ID_TABLE: table, **coded}
    ranks = IdRanks(ids, targets)
    n, k = ids.shape
    planes = hi_planes(len(ranks.table))
    low = np.empty((n, k), np.uint16)
    high = np.empty((n, planes, -(-k // HI_FIELDS)), np.uint8) if planes else None
    target_codes = ranks.codes(targets).astype(np.int32)
    stored_targets = target_codes.copy()
    for r0 in range(0, n, _BLOCK_ROWS):
        rows = slice(r0, r0 + _BLOCK_ROWS)
        stored = ordered = ranks.codes(ids[rows])
        if sort:  # entries of equal codes decode alike: their ids go in canonical order
            stored, ordered = sort_ties(stored, codes[rows])
        low[rows] = stored  # the low 16 bits
        if high is not None:
            pack_high(stored, high[rows])
        if schema_version >= V6:
            stored_targets[rows] = target_columns(ordered, target_codes[rows])
    arrays = {"target_ids": stored_targets, "ids": low}
    if high is not None:
        arrays[IDS_HI] = high
    return {**arrays, ID_TABLE: store_table(ranks.table), **coded}


def target_columns(row_codes: np.ndarray, target_codes: np.ndarray) -> np.ndarray:
    """schema_version 6's stored targets: ``-(j + 1)`` where entry j of the row (in stored order) is
    the target, else the target's code (>= 0). A teacher's row holds its target most of the time,
    and a column costs ~2 bits where a code costs ~14."""
    hit = row_codes == target_codes[:, None].astype(row_codes.dtype)
    column = hit.argmax(axis=1).astype(np.int32) if hit.shape[1] else np.zeros(len(hit), np.int32)
    return np.where(hit.any(axis=1), -(column + 1), target_codes).astype(np.int32)


def resolve_targets(stored: np.ndarray, row_ids: np.ndarray, table: np.ndarray, where: str) -> np.ndarray:
    """Target ids from a schema_version 6 shard's stored targets (a code >= 0, or ``-(j + 1)``: the
    row's entry j), the rows' decoded ids and the shard's table; a column outside the row is corruption."""
    stored = np.asarray(stored, np.int32)
    out = np.empty(stored.shape, np.int32)
    coded = stored >= 0
    try:
        out[coded] = decode_ids(stored[coded], table, where)
    except ValueError as e:  # a code outside the table
        raise CacheCorruptError(str(e)) from None
    in_row = np.flatnonzero(~coded)
    if in_row.size:
        columns = -stored[in_row] - 1
        if int(columns.max()) >= row_ids.shape[1]:
            raise CacheCorruptError(f"{where}: a target names column {int(columns.max())} of a {row_ids.shape[1]}-entry row")
        out[in_row] = row_ids[in_row, columns]
    return out
