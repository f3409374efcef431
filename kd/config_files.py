"""Config files (YAML or TOML) parsed strictly as data: no object tags, no eval."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``/``.toml``/``.json`` file into a dict, naming the file on error."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {p} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p}: not UTF-8 ({e})") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        else:  # YAML is a superset of JSON; safe_load refuses python object tags
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"config file {p}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: top level must be a mapping")
    return data


def build_requests_from_config(data: dict[str, Any], base: Path, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Expand a build config into one request dict per teacher.

    Top-level keys are defaults for every teacher; each entry of ``teachers`` may override
    them and names its ``model`` (and ``role``). Relative paths resolve against the config's folder.
    """
    teachers = data.get("teachers")
    if not isinstance(teachers, list) or not teachers:
        raise ValueError("build config needs a non-empty 'teachers' list")
    defaults = {k: v for k, v in data.items() if k != "teachers"}
    out = []
    for i, t in enumerate(teachers):
        if not isinstance(t, dict) or "model" not in t:
            raise ValueError(f"build config teachers[{i}] must be a mapping with 'model'")
        merged = {**defaults, **t, **{k: v for k, v in overrides.items() if v is not None}}
        merged["teacher"] = merged.pop("model")
        for key in ("teacher", "data", "out"):
            if key in merged and isinstance(merged[key], str) and "://" not in merged[key]:
                merged[key] = str((base / merged[key]).resolve()) if not Path(merged[key]).is_absolute() else merged[key]
        out.append(merged)
    return out
