"""The typed configuration of one distillation run, loadable from YAML / JSON / TOML plus overrides.

Three sections: the run itself (student, data, teachers, output), ``loss`` (which terms, their
weights and how teachers and losses are combined) and ``train`` (optimiser, schedule, logging,
evaluation, checkpoints). Every field is checked when the config is built, and an unknown key is
an error naming the valid ones, so a typo never silently falls back to a default.

Overrides are ``section.field=value`` strings (``train.lr=1e-4``, ``teachers.planning=/caches/p``,
``loss.agp=true``); the value is parsed as YAML and then coerced to the field's type.

Paths are taken relative to the working directory; ``resolved()`` makes them absolute, and that
resolved form is what a run directory records in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml

__all__ = ["LossConfig", "TrainConfig", "DistillConfig", "load_config", "apply_overrides"]


@dataclass
class LossConfig:
    """Loss terms and how they are combined.

    Term weights: ``ce`` on the answer tokens; per teacher ``kd`` (logit KD: top-k or sampled, as the
    cache holds), ``hidden`` (hidden-state matching through learned projectors) and ``attention``
    (attention-map MSE). A term runs only when its weight is > 0 *and* the teacher's cache holds
    that signal. Each teacher's terms are weighted per sample by the mixing matrix row of the
    sample's capability (``mixing_diag`` on the matching teacher, or an explicit ``mixing_matrix``
    with rows and columns in the order of ``teachers``).

    ``weighting="learnable"`` replaces the fixed ``ce`` / teacher balance with GradNorm-like learned
    weights over ``{ce, one loss per teacher}`` with ``w_ce >= ce_floor``; ``agp=True`` combines the
    per-loss gradients with Asymmetric Gradient Projection.

    Layer maps (defaults are automatic, see ``objective.py``): ``hidden_layer_map`` is
    ``{role: {student hidden layer: teacher hidden layer}}``; ``attention_layer_map`` is
    ``{role: {student attention layer: [teacher layers averaged]}}``.
    """

    ce: float = 1.0
    kd: float = 1.0
    kd_kind: Literal["forward", "reverse", "jsd"] = "forward"
    kd_beta: float = 0.5
    temperature: float = 1.0
    kd_tail: Literal["bucket", "renorm"] = "bucket"
    tail_temperature: Literal["bucket", "student_exact"] = "bucket"
    hidden: float = 1.0
    hidden_kind: Literal["mse", "cosine"] = "mse"
    hidden_layer_map: dict[str, dict[int, int]] = field(default_factory=dict)
    attention: float = 1.0
    attention_layer_map: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    mixing_diag: float = 0.8
    mixing_matrix: list[list[float]] | dict[str, dict[str, float]] | None = None  # or {capability: {role: w}}
    unknown_capability: Literal["error", "uniform"] = "error"
    weighting: Literal["fixed", "learnable"] = "fixed"
    ce_floor: float = 0.6
    gradnorm_alpha: float = 0.0
    weights_lr: float = 0.025
    agp: bool = False
    agp_shuffle: bool = True

    def __post_init__(self) -> None:
        _coerce_fields(self, "loss")
        for name in ("ce", "kd", "hidden", "attention"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.kd_kind == "jsd" and not 0 < self.kd_beta < 1:
            raise ValueError(f"loss.kd_beta must lie in (0, 1) for kd_kind=jsd, got {self.kd_beta}")
        if not 0 <= self.mixing_diag <= 1:
            raise ValueError(f"loss.mixing_diag must lie in [0, 1], got {self.mixing_diag}")
        if not 0 <= self.ce_floor < 1:
            raise ValueError(f"loss.ce_floor must lie in [0, 1), got {self.ce_floor}")
        if self.agp and self.ce <= 0:
            raise ValueError("loss.agp needs the CE anchor: loss.ce must be > 0")


@dataclass
class TrainConfig:
    """Optimiser, schedule, precision, logging, evaluation and checkpoints.

    Steps are optimiser steps; one step consumes ``batch_size * grad_accum`` samples per process,
    so ``batch_size * grad_accum * num_processes`` under DDP (``accelerate launch``). To reproduce a
    single-process run on ``N`` processes, divide ``grad_accum`` by ``N`` and keep ``batch_size``:
    the ranks then see exactly the single run's micro-batches (losses are token-weighted means per
    micro-batch, so dividing ``batch_size`` instead reweights tokens slightly).
    ``max_steps`` (when set) overrides ``epochs``. ``log_samples`` adds to every logged train step
    the sample ids each rank trained on (``sample_ids``: one list per rank) to audit data sharding.
    The schedule is linear warmup over ``warmup_steps`` (or ``warmup_ratio`` of the steps when that
    is None) then cosine decay to ``min_lr_ratio * lr``. ``mixed_precision="auto"`` uses bf16
    autocast only on a CUDA device that supports it. ``eval_every`` / ``save_every`` = 0 means only at the end of the run.
    ``cache_mib`` bounds the decoded cache chunks kept for reuse, all teachers together, in each
    process that reads caches (the main one and every data-loader worker): host memory, never GPU.
    """

    lr: float = 5e-5
    projector_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 1
    grad_accum: int = 4
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    num_workers: int = 0
    cache_mib: int = 512
    log_every: int = 1
    eval_every: int = 0
    eval_batch_size: int = 8
    eval_max_new_tokens: int = 8
    eval_max_samples: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    log_samples: bool = False

    def __post_init__(self) -> None:
        _coerce_fields(self, "train")
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "eval_batch_size", "eval_max_new_tokens",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_max_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "num_workers", "weight_decay", "max_grad_norm", "cache_mib"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.warmup_ratio must lie in [0, 1) and train.min_lr_ratio in [0, 1]")
        if not self.lr > 0 or (self.projector_lr is not None and not self.projector_lr > 0):
            raise ValueError("train.lr and train.projector_lr must be > 0")


@dataclass
class DistillConfig:
    """One distillation run.

    ``student``: a transformers model directory (weights + tokenizer/processor). ``data``: the
    training JSONL (stage-one format). ``teachers``: ``{role: cache url}``; roles name
    capabilities (perception / reasoning / planning or any tags the data uses). ``out``: the run
    directory. ``val_data``: a JSONL scored by exact match during and after training.
    ``vocab_maps``: ``{role: map}`` for a teacher whose tokenizer differs from the student's; the
    map is a JSON file ``{teacher_id: student_id}``, a teacher tokenizer directory (matched by
    exact token strings), or ``"auto"`` (the ``model_dir`` the cache manifest records).
    ``missing``: a sample absent from a cache is an ``"error"`` (default) or ``"skip"``ped.
    ``resume``: continue from the last checkpoint in ``out``.
    """

    student: str
    data: str
    teachers: dict[str, str]
    out: str
    val_data: str | None = None
    vocab_maps: dict[str, str] = field(default_factory=dict)
    missing: Literal["error", "skip"] = "error"
    resume: bool = False
    quiet: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**_known(LossConfig, self.loss, "loss"))
        if isinstance(self.train, dict):
            self.train = TrainConfig(**_known(TrainConfig, self.train, "train"))
        _coerce_fields(self, "")
        for name in ("student", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if not self.teachers:
            raise ValueError("teachers must name at least one {role: cache url}")
        unknown = sorted(set(self.vocab_maps) - set(self.teachers))
        if unknown:
            raise ValueError(f"vocab_maps names roles {unknown} that are not teachers {sorted(self.teachers)}")
        for name in ("hidden_layer_map", "attention_layer_map"):
            unknown = sorted(set(getattr(self.loss, name)) - set(self.teachers))
            if unknown:
                raise ValueError(f"loss.{name} names roles {unknown} that are not teachers {sorted(self.teachers)}")
        if self.loss.mixing_matrix is not None:  # every entry checked here, before anything is loaded
            from kd.pipeline.distill.mixing import resolve_mixing

            try:
                resolve_mixing(self.loss.mixing_matrix, list(self.teachers))
            except ValueError as e:
                raise ValueError(f"loss.mixing_matrix: {e}") from None

    @property
    def roles(self) -> list[str]:
        return list(self.teachers)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        return cls(**_known(cls, d, ""))

    def resolved(self) -> DistillConfig:
        """A copy with existing local paths (and ``out``) made absolute; URLs and hub ids are kept."""

        def absolute(p: str | None, must_exist: bool = True) -> str | None:
            if p is None or "://" in p or (must_exist and not Path(p).expanduser().exists()):
                return p  # URLs and names that are not local paths (e.g. a hub id) stay as given
            return str(Path(p).expanduser().resolve())

        d = self.to_dict()
        for name in ("student", "data", "val_data"):
            d[name] = absolute(d[name])
        d["out"] = absolute(d["out"], must_exist=False)
        d["teachers"] = {r: absolute(u) for r, u in d["teachers"].items()}
        d["vocab_maps"] = {r: v if v == "auto" else absolute(v) for r, v in d["vocab_maps"].items()}
        return DistillConfig.from_dict(d)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                **fields: Any) -> DistillConfig:
    """Build a config from a YAML / JSON / TOML file (optional), then keyword fields, then overrides.

    ``fields`` are top-level values (``student=...``, ``train={"lr": 1e-4}`` merges into the
    section); ``overrides`` are ``"a.b=value"`` strings applied last.
    """
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            d = tomllib.loads(text)
        else:
            d = yaml.safe_load(text) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: the config must be a mapping, got {type(d).__name__}")
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return DistillConfig.from_dict(apply_overrides(d, overrides))


def apply_overrides(d: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` overrides to a nested dict (copied); values parse as YAML."""
    out = json.loads(json.dumps(d, default=str)) if d else {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise ValueError(f"override {item!r} has an empty key")
        node = out
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


# ----------------------------------------------------------------------------- typing helpers


def _known(cls: type, d: dict[str, Any], section: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{section or 'config'} must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f"{section}." if section else ""
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; valid: {sorted(names)}")
    return dict(d)


def _coerce_fields(obj: Any, section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in ("loss", "train") and section == "":
            continue
        name = f"{section}.{f.name}" if section else f.name
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], name))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        by_kind = [a for a in inner if isinstance(value, dict) == (typing.get_origin(a) is dict)]
        return _coerce(value, (by_kind or inner)[0], name)  # a mapping takes the union's dict type
    if origin is Literal:
        if isinstance(value, bool) and ("no" if not value else "yes") in args:
            value = "no" if not value else "yes"  # YAML 1.1 reads a bare no / yes as a bool
        if value not in args:
            raise ValueError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            out = hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and out != value:
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return os.fspath(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        kt, vt = args
        return {_coerce(k, kt, f"{name} key"): _coerce(v, vt, f"{name}[{k!r}]") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{name} must have {len(args)} entries, got {value!r}")
            return tuple(_coerce(v, t, name) for v, t in zip(value, args))
        return origin(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    return value


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {(str(k) if not isinstance(k, str) else k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
