"""`kd cache ls` and `kd cache inspect` as plain data: order, filters, cells, column fitting, blocks.

The entries themselves (``CacheEntry``, found by ``summary.scan``) come from ``summary.py``. Kept free of rich (and torch) so the choices that make the output readable (which columns
a narrow terminal drops, how signals are abbreviated, how a hash is shortened) are plain
functions that tests can check without a terminal, and other front ends can reuse.
``kd/cli_render.py`` only turns what this module decides into rich tables.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .summary import CacheEntry

SHORT_HASH = 16  # hex characters of a hash shown in a table; --json always has the full hash
GAPS = (2, 1)  # spaces between two table columns: two, or one where that keeps a column in

# Columns of the `kd cache ls` table, left to right.
COLUMNS: tuple[str, ...] = ("name", "role", "signals", "samples", "tokens", "size", "sealed", "created")
HEADERS: dict[str, str] = {"name": "name", "role": "role", "signals": "signals", "samples": "samples",
                           "tokens": "tokens", "size": "size", "sealed": "sealed", "created": "created (UTC)"}
RIGHT_ALIGNED = frozenset({"samples", "tokens", "size"})
# When the table is wider than the terminal, columns go in this order until it fits; the name
# never goes (it is the handle passed to --teacher). `sealed` goes first because an unsealed
# cache also says so in its `created` cell. Documented in `kd cache ls --help` and the README.
DROP_ORDER: tuple[str, ...] = ("sealed", "tokens", "size", "samples", "created", "signals", "role")
SIGNAL_SEP = " · "


def by_created(entries: Iterable[CacheEntry]) -> list[CacheEntry]:
    """Oldest first, newest last (the one just built is next to the prompt); unsealed caches,
    which have no creation time yet, come after every sealed one, by name."""
    earliest = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return sorted(entries, key=lambda e: (e.created is None, _parse_time(e.created) or earliest, e.name))


def _parse_time(iso: str | None) -> _dt.datetime | None:
    if not iso:
        return None
    try:
        t = _dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True)
class Filters:
    """`kd cache ls` filters; each one that is set must match (all of them, not any)."""

    teacher: str | None = None  # substring of the teacher name or the cache name, any case
    role: str | None = None  # the role, any case
    dataset: str | None = None  # a prefix of the dataset fingerprint (hex)

    def __post_init__(self) -> None:
        if self.dataset is not None and not HEX.fullmatch(self.dataset):
            raise ValueError(f"--dataset wants a dataset file or a prefix of its fingerprint (hex digits), "
                             f"got {self.dataset!r}")

    def active(self) -> bool:
        return any(v is not None for v in (self.teacher, self.role, self.dataset))

    def describe(self) -> str:
        return " ".join(f"--{k} {v}" for k, v in (("teacher", self.teacher), ("role", self.role),
                                                    ("dataset", self.dataset)) if v is not None)

    def match(self, e: CacheEntry) -> bool:
        if self.teacher is not None:
            wanted = self.teacher.lower()
            if wanted not in (e.teacher or "").lower() and wanted not in e.name.lower():
                return False
        if self.role is not None and (e.role or "").lower() != self.role.lower():
            return False
        if self.dataset is not None and not (e.dataset or "").lower().startswith(self.dataset.lower()):
            return False
        return True


def signal_parts(signals: Mapping[str, Any] | None) -> list[str]:
    """The signals a cache holds, one short part each: ``top16 fp16``, ``h[2]``, ``attn full[1,2]``.

    Coding of hidden states / attention maps is named only when it is not the fp16 default,
    so the common case stays short and a bf16 or fp32 cache stands out.
    """
    if not signals:
        return []
    k = signals.get("top_k")
    coding = signals.get("value_coding", "fp16")
    if signals.get("logits") == "sampled":
        parts = [f"sampled{k}x{signals.get('sampled_draws', 0)} {coding}"]
    else:
        parts = [f"top{k} {coding}"]
    hidden = signals.get("hidden_layers") or []
    if hidden:
        hc = signals.get("hidden_coding", "fp16")
        parts.append(f"h{_layers(hidden)}" + ("" if hc == "fp16" else f" {hc}"))
    attn = signals.get("attention_layers") or []
    if attn:
        kinds = "+".join(signals.get("attention_kinds") or [])
        ac = signals.get("attention_coding", "fp16")
        parts.append(f"attn {kinds}{_layers(attn)}" + ("" if ac == "fp16" else f" {ac}"))
    return parts


def _layers(layers: Sequence[int]) -> str:
    return "[" + ",".join(str(x) for x in layers) + "]"


def signals_compact(signals: Mapping[str, Any] | None) -> str:
    return SIGNAL_SEP.join(signal_parts(signals))


def wrap_parts(parts: Sequence[str], width: int) -> str:
    """Join signal parts with `` · `` into lines of at most ``width`` (a part is never split)."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(SIGNAL_SEP) + len(part) <= width:
            lines[-1] += SIGNAL_SEP + part
        else:
            lines.append(part)
    return "\n".join(lines)


def created_minute(iso: str | None) -> str:
    """``2026-01-30 14:05`` in UTC (the manifest's clock), or the raw text if it is not ISO 8601."""
    t = _parse_time(iso)
    if t is None:
        return iso or ""
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def human_bytes(n: int | None) -> str:
    """Decimal units (kB, MB, GB, as `du --si`), three significant digits."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def short_hash(h: str | None, n: int = SHORT_HASH) -> str:
    return "" if not h else (h if len(h) <= n else h[:n] + "…")


def cells(e: CacheEntry) -> dict[str, str]:
    """The text of each `kd cache ls` column for one entry (signals unwrapped)."""
    return {
        "name": e.name,
        "role": e.role or "-",
        "signals": signals_compact(e.signals),
        "samples": "" if e.samples is None else f"{e.samples:,}",
        "tokens": "" if e.tokens is None else f"{e.tokens:,}",
        "size": human_bytes(e.bytes),
        "sealed": "yes" if e.sealed else "no",
        # An unsealed cache has no creation time; saying so here keeps it visible once `sealed` is dropped.
        "created": created_minute(e.created) if e.sealed else ("unreadable" if e.broken else "unsealed"),
    }


@dataclass(frozen=True)
class Layout:
    """Which columns a `kd cache ls` table shows, and how wide signals may be (they wrap)."""

    columns: tuple[str, ...]
    widths: dict[str, int] = field(default_factory=dict)
    gap: int = GAPS[0]  # spaces between columns

    def dropped(self) -> tuple[str, ...]:
        return tuple(c for c in DROP_ORDER if c not in self.columns)


def fit_columns(entries: Sequence[CacheEntry], width: int) -> Layout:
    """Drop columns in ``DROP_ORDER`` until the table fits ``width`` characters.

    Before a column is dropped, columns move from two spaces apart to one, and then signals
    wrap (at `` · ``, never inside a part, down to their longest part): the first of these
    that fits wins. The name is always kept whole; if it alone is wider than ``width`` the
    layout is just the name.
    """
    rows = [cells(e) for e in entries]
    natural = {c: max([len(HEADERS[c])] + [len(r[c]) for r in rows]) for c in COLUMNS}
    parts = [p for e in entries for p in signal_parts(e.signals)]
    minimum = dict(natural, signals=max([len(HEADERS["signals"])] + [len(p) for p in parts]))

    def need(kept: list[str], sizes: dict[str, int], gap: int) -> int:
        return sum(sizes[c] for c in kept) + gap * (len(kept) - 1)

    kept, gap = list(COLUMNS), GAPS[-1]
    for victim in (None,) + DROP_ORDER:
        if victim is not None:
            kept.remove(victim)
        tries = [(g, sizes) for sizes in (natural, minimum) for g in GAPS]
        fit = next(((g, sizes) for g, sizes in tries if need(kept, sizes, g) <= width), None)
        if fit is not None:
            gap = fit[0]
            break
    widths = {c: natural[c] for c in kept}
    if "signals" in kept:
        others = need([c for c in kept if c != "signals"], natural, gap) + gap
        widths["signals"] = max(minimum["signals"], min(natural["signals"], width - others))
    return Layout(tuple(kept), widths, gap)


def table_rows(entries: Sequence[CacheEntry], layout: Layout) -> list[list[str]]:
    """Cell text per row for ``layout``, signals wrapped to their width."""
    out = []
    for e in entries:
        c = cells(e)
        if "signals" in layout.columns:
            c["signals"] = wrap_parts(signal_parts(e.signals), layout.widths["signals"])
        out.append([c[col] for col in layout.columns])
    return out


def long_block(e: CacheEntry) -> list[tuple[str, str]]:
    """`kd cache ls --long`: every field of one cache, hashes in full, one per line."""
    rows = [("path", e.path), ("teacher", e.teacher or ""), ("role", e.role or "-"),
            ("signals", signals_compact(e.signals)), ("samples", cells(e)["samples"]), ("tokens", cells(e)["tokens"]),
            ("size", human_bytes(e.bytes)), ("sealed", "yes" if e.sealed else f"no: {e.status}"),
            ("created", created_minute(e.created) + " UTC" if e.created else ""),
            ("key", e.key or ""), ("dataset", e.dataset or "")]
    if e.parent:
        rows.insert(5, ("parent", f"{e.parent} ({e.samples - (e.own_samples or 0):,} samples from it, "
                                  f"{e.own_samples or 0:,} here)"))
    return [(k, v) for k, v in rows if v]


def lineage_note(e: CacheEntry) -> str | None:
    """The line `kd cache ls` prints under its table for a child cache (names whole, never dropped):
    which cache it grows and how many of its samples come from there."""
    if not e.parent:
        return None
    own = e.own_samples or 0
    return f"{e.name} grows {e.parent}: {own:,} new or changed samples here, {(e.samples or 0) - own:,} from the parent chain"
