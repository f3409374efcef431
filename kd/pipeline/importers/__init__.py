"""Import datasets in other formats into kd's stage-one JSONL (``kd data import FORMAT SRC --out DIR``).

One module per source format (``drivelm``, ``llava``, ``tables`` for Parquet and Hugging Face
``datasets`` folders), all writing through ``common.Staging``: the output is ``OUT/data.jsonl``
(+ ``OUT/images/`` for embedded image bytes, + ``OUT/import.json`` saying where it came from),
validated by ``kd.pipeline.common.dataset.load_records`` before it appears, or nothing at all
with an ``ImportFailed`` listing every bad entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import ImportFailed, ImportResult, SourceProblem
from .drivelm import CAMERAS, CAPABILITY_MAP, import_drivelm, parse_capability_map
from .llava import import_llava
from .tables import Columns, import_hf, import_parquet

FORMATS = ("drivelm", "llava", "parquet", "hf")


def import_dataset(fmt: str, src: str | Path, out: str | Path, **options: Any) -> ImportResult:
    """Dispatch to the importer of ``fmt`` (one of ``FORMATS``); ``options`` are its keyword arguments."""
    importers = {"drivelm": import_drivelm, "llava": import_llava, "parquet": import_parquet, "hf": import_hf}
    if fmt not in importers:
        raise ValueError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    return importers[fmt](src, out, **options)


__all__ = ["CAMERAS", "CAPABILITY_MAP", "Columns", "FORMATS", "ImportFailed", "ImportResult", "SourceProblem",
           "import_dataset", "import_drivelm", "import_hf", "import_llava", "import_parquet", "parse_capability_map"]
