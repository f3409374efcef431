"""Rich rendering of `kd cache ls` and `kd cache inspect` for a terminal of any width.

What to show and which columns a narrow terminal drops is decided in
``kd.cache_schema.listing`` / ``inspection`` (plain data, tested without a terminal); this
module only lays those decisions out with rich, at the console's width. Every cell is a
``Text`` (never markup), so names and signals such as ``h[2]`` print as they are.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from kd.cache_schema.inspection import Block, blocks, compare
from kd.cache_schema.listing import HEADERS, RIGHT_ALIGNED, CacheEntry, fit_columns, lineage_note, long_block, table_rows


def render_ls(entries: Sequence[CacheEntry], console: Console) -> None:
    """The `kd cache ls` table at ``console.width``; a footnote names any dropped column."""
    layout = fit_columns(entries, console.width)
    if layout.columns == ("name",) and max(len(e.name) for e in entries) > console.width:
        for e in entries:  # too narrow for a table: whole names, one per line, wrapped by the terminal
            console.print(Text(e.name), soft_wrap=True)
        return
    table = Table(box=None, padding=(0, 0, 0, layout.gap), pad_edge=False, show_edge=False, header_style="bold")
    for col in layout.columns:
        table.add_column(HEADERS[col], justify="right" if col in RIGHT_ALIGNED else "left", no_wrap=True,
                         width=layout.widths[col], overflow="ignore" if col == "name" else "ellipsis")
    for row in table_rows(entries, layout):
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)
    for e in entries:
        if e.broken:
            console.print(Text(f"{e.name}: {e.status}", style="red"), soft_wrap=True)
    for note in filter(None, map(lineage_note, entries)):  # a child cache and the cache it grows
        console.print(Text(note), soft_wrap=True)
    dropped = layout.dropped()
    if dropped:
        console.print(Text(f"(not shown at {console.width} columns: {', '.join(dropped)}; see --long)", style="dim"),
                      soft_wrap=True)


def render_long(entries: Sequence[CacheEntry], console: Console) -> None:
    """`kd cache ls --long`: one block per cache, every field and the full hashes."""
    for i, e in enumerate(entries):
        if i:
            console.print()
        render_block((e.name, long_block(e)), console, label_width=len("created"))


def render_block(block: Block, console: Console, label_width: int = 0) -> None:
    """A bold title, then ``label  value`` lines indented by two; long values fold, never cut.

    ``label_width`` lines values up across the blocks of one command.
    """
    title, rows = block
    console.print(Text(title, style="bold"), soft_wrap=True)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True, min_width=label_width)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(Text(label), Text(value))
    console.print(Padding(grid, (0, 0, 0, 2), expand=False))


def _label_width(all_blocks: Sequence[Block]) -> int:
    return max((len(label) for _, rows in all_blocks for label, _ in rows), default=0)


def render_inspect(summaries: Sequence[Mapping], console: Console) -> None:
    """Each cache's blocks, then (for two or more caches) what differs between them."""
    per_cache = [blocks(s) for s in summaries]
    extra = [compare(summaries)] if len(summaries) > 1 else []
    width = _label_width([b for bs in per_cache for b in bs] + extra)
    for i, cache_blocks in enumerate(per_cache):
        if i:
            console.print()
        for block in cache_blocks:
            render_block(block, console, width)
    for block in extra:
        console.print()
        render_block(block, console, width)
