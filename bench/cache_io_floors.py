"""bench/cache_io.py's entropy estimates: what each array of a value coding holds, in bytes/token,
set against what the cache stores (``floors``: what shuffle + zstd, LZ + order-0 Huffman of
bytes, can approach)."""

from __future__ import annotations

import numpy as np

from kd.cache_schema.codecs import encode_logprobs, folded_mask


def entropy_bits(x: np.ndarray) -> float:
    """Plug-in order-0 entropy of the values of ``x`` in bits/symbol, Miller-Madow corrected
    (the plug-in estimate alone is biased low when the alphabet is large next to the sample)."""
    flat = np.ravel(x)
    if flat.size == 0:
        return 0.0
    if flat.dtype.kind in "iub" and int(flat.max()) - int(flat.min()) < (1 << 24):
        counts = np.bincount(flat.astype(np.int64) - int(flat.min()))
        counts = counts[counts > 0]
    else:
        counts = np.unique(flat, return_counts=True)[1]
    p = counts / flat.size
    return float(-(p * np.log2(p)).sum() + (len(counts) - 1) / (2 * flat.size * np.log(2)))


def column_entropy_bytes(a: np.ndarray) -> float:
    """Sum over columns of each column's order-0 entropy, in bytes per row."""
    return sum(entropy_bits(a[:, j]) for j in range(a.shape[1])) / 8


def byte_plane_entropy_bytes(a: np.ndarray) -> float:
    """Order-0 entropy of each byte plane of a 1-D array (what byte-shuffle + an entropy coder
    reaches with no modelling), in bytes per element: an estimate for float arrays, not a floor."""
    planes = np.ascontiguousarray(a).view(np.uint8).reshape(a.shape[0], a.dtype.itemsize)
    return column_entropy_bytes(planes)


def floors(data, coding: str) -> dict[str, tuple[float, str]]:
    """Entropy estimates in bytes/token of what each array of ``coding`` holds on ``data``.

    ids: "ordered" = per-column order-0 entropy (each rank position coded with its own model;
    no lossless coder that codes ids one at a time without context can beat it; u8's folded
    entries are not charged, the codes tell where they are), "order-0" = one
    model for all positions, "set" = order-0 minus log2(k!) (the rank order dropped, as if it were
    uniform: an estimate). Log-prob codes: per-column order-0 entropy of the stored (delta) codes.
    Floats (fp32 log-probs, ``logprob_ref``, ``tail_logmass``): byte-plane order-0 entropy, an
    estimate of what shuffle + entropy coding reaches, not a floor (continuous values have none).
    ``target_ids``: entropy of the target's column in the row (k = not in the row) plus an order-0 id
    for each miss: its cost given the row's ids.
    """
    coded = encode_logprobs(data.logprobs, data.tail_logmass, coding)
    folded = folded_mask(coded, coding)
    ids = data.ids if folded is None else np.where(folded, -1, data.ids).astype(np.int32)
    k = ids.shape[1]
    h_id = entropy_bits(ids)
    kept = np.ones(ids.shape, bool) if folded is None else ~folded
    # u8: which entries are folded (id -1) is already told by the log-prob codes (255): not charged.
    ordered = sum(entropy_bits(ids[kept[:, j], j]) * kept[:, j].mean() for j in range(k)) / 8
    out = {
        "ids (ordered)": (ordered, "per-column order-0"),
        "ids (order-0)": (k * h_id / 8, "one model for all columns"),
        "ids (set)": ((k * h_id - float(np.sum(np.log2(np.arange(1, k + 1))))) / 8, "order-0 minus log2(k!), estimate"),
    }
    stored = coded["logprobs"]
    if coding == "fp32":
        out["logprobs"] = (sum(byte_plane_entropy_bytes(stored[:, j]) for j in range(k)), "byte-plane order-0 per column")
    else:
        out["logprobs"] = (column_entropy_bytes(stored), "per-column order-0 of the delta codes")
    if "logprob_ref" in coded:
        out["logprob_ref"] = (byte_plane_entropy_bytes(coded["logprob_ref"]), "byte-plane order-0")
    out["tail_logmass"] = (byte_plane_entropy_bytes(coded["tail_logmass"]), "byte-plane order-0")
    hit = ids == data.target_ids[:, None]
    col = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
    miss = float((col == k).mean())
    out["target_ids"] = ((entropy_bits(col) + miss * h_id) / 8, "column in the row + order-0 id per miss")
    return out


OVERHEAD = ("zarr.json", "index.parquet", "manifest+commit")


def stored_bytes(row: dict, array: str) -> float:
    """Bytes/token of one array; ``ids`` includes its ``id_table`` and ``ids_hi``."""
    sizes = row["sizes"]
    return sizes.get(array, 0.0) + (sizes.get("id_table", 0.0) + sizes.get("ids_hi", 0.0) if array == "ids" else 0.0)


def floor_total(row: dict) -> float:
    """Entropy estimate of the whole cache: ordered-id floor + each array's estimate + overhead as stored."""
    f = row["floors"]
    est = f["ids (ordered)"][0] + sum(v for name, (v, _) in f.items() if not name.startswith("ids"))
    return est + sum(row["sizes"].get(a, 0.0) for a in OVERHEAD)


def print_floors(rows: list[dict]) -> None:
    print("\nStored bytes/token vs entropy estimates (floors() explains each; gap = stored - estimate):")
    for r in rows:
        f = r["floors"]
        print(f"  {r['coding']}: {r['bpt']:.1f} B/token stored, {floor_total(r):.1f} estimated "
              "(ordered ids + each array's estimate + overhead as stored)")
        ids_total = stored_bytes(r, "ids")
        print(f"    {'ids+table+hi':<16} {ids_total:7.2f}  ordered {f['ids (ordered)'][0]:.2f} (gap {ids_total - f['ids (ordered)'][0]:+.2f}), "
              f"order-0 {f['ids (order-0)'][0]:.2f}, set ~{f['ids (set)'][0]:.2f}")
        for name, (value, kind) in f.items():
            if not name.startswith("ids"):
                got = stored_bytes(r, name)
                print(f"    {name:<16} {got:7.2f}  {kind} {value:.2f} (gap {got - value:+.2f})")
