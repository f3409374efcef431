"""The run directory's bookkeeping: resolved config, teacher caches, metrics (JSONL + TensorBoard).

Layout::

    <out>/config.json      the resolved DistillConfig (absolute paths)
    <out>/teachers.json    {role: {url, key, signals, teacher, samples, vocab_map, caches}} of the caches read
                           (caches: [{name, url, key, samples, parent}], the cache and every parent it grows)
    <out>/metrics.jsonl    one JSON object per logged train step (loss, terms, tokens, samples,
                           num_processes; sample_ids per rank with train.log_samples) / evaluation
    <out>/tb/              TensorBoard events (same scalars)
    <out>/checkpoints/     see checkpoint.py
    <out>/model/           the final student (safetensors) and its processor
    <out>/eval.json        the final validation result (when val_data is set)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import DistillConfig

__all__ = ["write_run_files", "check_resume_compatible", "MetricsLogger", "RESUME_FREE_FIELDS"]

# Fields that may change between a run and its resume (they do not change what is trained).
RESUME_FREE_FIELDS = frozenset({
    "out", "resume", "quiet", "val_data", "train.log_every", "train.eval_every", "train.eval_batch_size",
    "train.eval_max_new_tokens", "train.eval_max_samples", "train.save_every", "train.keep_checkpoints",
    "train.num_workers", "train.log_samples",
})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("loss", "train"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _dump(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_run_files(run_dir: Path, cfg: DistillConfig, teachers: dict[str, dict[str, Any]],
                    plans: dict[str, Any] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _dump(run_dir / "config.json", cfg.to_dict())
    doc = {role: {**info, **({"plan": plans[role]} if plans and role in plans else {})} for role, info in teachers.items()}
    _dump(run_dir / "teachers.json", doc)


def check_resume_compatible(run_dir: Path, cfg: DistillConfig, teachers: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume with another training setup or other caches than the run recorded."""
    old_path = run_dir / "config.json"
    if old_path.exists():
        old = _flat(DistillConfig.from_dict(json.loads(old_path.read_text())).to_dict())
        new = _flat(cfg.to_dict())
        diff = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE_FIELDS and old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"cannot resume {run_dir}: config differs from the recorded run in {diff}")
    old_teachers = run_dir / "teachers.json"
    if old_teachers.exists():
        recorded = json.loads(old_teachers.read_text())
        changed = sorted(r for r in set(recorded) | set(teachers)
                         if recorded.get(r, {}).get("key") != teachers.get(r, {}).get("key"))
        if changed:
            raise ValueError(f"cannot resume {run_dir}: teacher caches changed for roles {changed} (keys differ)")


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and their numeric leaves to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        split, step = record.get("split", "train"), int(record.get("step", 0))
        for key, value in _scalars(record).items():
            if key not in ("step", "split", "epoch"):
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _scalars(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out
