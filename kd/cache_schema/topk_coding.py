"""A shard's top-k arrays from its teacher rows, as SPEC.md sections 5 and 6 define them.

The writer's one call for the token-level top-k signal: the value coding (``codecs``), the folding
of ``u8``, the frequency-rank id codes and their tie order (``id_coding``), for the layout of the
cache's ``schema_version``: 5 (what kd writes: uint16 codes + ``ids_hi``, targets as codes, the
table as differences) or 2-4 (what tests write to check that old shards read).
After the table is built, rows are coded in blocks whose temporaries stay in the CPU's cache.
"""

from __future__ import annotations

import numpy as np

from .codecs import U8_FOLDED, U8_LEVELS, U8_PAD, encode_logprobs_codes
from .id_coding import HI_FIELDS, ID_TABLE, IDS_HI, IdRanks, encode_ids, hi_planes, pack_high, sort_ties, store_table

V5 = 5  # the first schema_version of the layout above (SPEC.md, Versioning)
_BLOCK_ROWS = 2048


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, targets: np.ndarray, coding: str,
                schema_version: int = V5) -> dict[str, np.ndarray]:
    """``target_ids``, ``ids`` (+ ``ids_hi``), ``id_table``, ``logprobs`` and ``tail_logmass`` of
    ``[N, k]`` rows sorted by descending log-prob (``u8``: folded entries' ids become -1)."""
    coded, codes = encode_logprobs_codes(logprobs, tail, coding, U8_FOLDED if schema_version >= V5 else U8_PAD)
    ids = np.asarray(ids, np.int32)
    targets = np.asarray(targets, np.int32)
    if codes is not None:  # u8: folded entries have no id (SPEC.md section 6)
        ids = np.where(codes >= U8_LEVELS, np.int32(-1), ids)
    if schema_version < V5:
        id_codes, table = encode_ids(ids)
        if codes is not None and schema_version >= 3:
            id_codes = sort_ties(id_codes, codes)
        return {"target_ids": targets, "ids": id_codes, ID_TABLE: table, **coded}
    ranks = IdRanks(ids, targets)
    n, k = ids.shape
    planes = hi_planes(len(ranks.table))
    low = np.empty((n, k), np.uint16)
    high = np.empty((n, planes, -(-k // HI_FIELDS)), np.uint8) if planes else None
    for r0 in range(0, n, _BLOCK_ROWS):
        rows = slice(r0, r0 + _BLOCK_ROWS)
        stored = ranks.codes(ids[rows])
        if codes is not None:  # entries of equal codes decode alike: their ids go in canonical order
            stored = sort_ties(stored, codes[rows])
        low[rows] = stored  # the low 16 bits
        if high is not None:
            pack_high(stored, high[rows])
    arrays = {"target_ids": ranks.codes(targets).astype(np.int32), "ids": low}
    if high is not None:
        arrays[IDS_HI] = high
    return {**arrays, ID_TABLE: store_table(ranks.table), **coded}
