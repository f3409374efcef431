"""The distillation objective: CE plus, per teacher, logit KD, hidden-state and attention-map terms.

Weighting, one rule for every term: a batch term is a token-weighted mean over the batch in which
each answer token carries its sample's mixing weight for that teacher,

    term_r = sum_b w[b, r] * T_b * loss(sample b) / N,       N = sum_b T_b,

where ``loss(sample b)`` is the library loss (``kd.pipeline.losses``) on sample ``b``'s rows (its
mean over rows), ``T_b`` its answer tokens and ``w[b, r]`` the mixing-matrix entry of the sample's
capability for teacher ``r`` (a single teacher has ``w = 1`` for every sample, whatever its
capability). For logit KD this is exactly the row-weighted mean of the per-row losses. Hidden
and attention terms average over their mapped layers. A teacher's loss is

    L_r = kd * KD_r + hidden * H_r + attention * (mean over t2v and full pairs of A_r),

with only the terms whose weight is > 0 and whose signal the cache holds. The named losses
``{"ce": CE, role: L_r}`` are what fixed weights (``ce`` for CE, 1 for each teacher), learnable
weights and AGP combine.

Default layer maps (override per role in the config):

* hidden: ``losses.layer_map`` from the student's depth to the cached teacher layers (teacher
  depth from the cache manifest when known, else the deepest cached layer);
* t2v attention (Drive-KD): role ``perception`` -> student layer 0, any other role (planning) ->
  the student's penultimate layer; the target is the mean of the cached t2v layers;
* full attention (Drive-KD reasoning): student layers ``0 .. L-2``, each matched to the mean of a
  group of cached teacher layers (``losses.group_teacher_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kd.pipeline.losses import (
    HiddenProjector,
    answer_ce_loss,
    group_teacher_layers,
    hidden_state_loss,
    layer_map,
    padded_attention_map_loss,
    sampled_kd_loss,
    topk_kd_loss,
)
from kd.pipeline.mixing import mixing_matrix, resolve_mixing, teacher_weights

from .config import LossConfig
from .student import StudentOutputs

__all__ = [
    "DistillObjective",
    "LossBreakdown",
    "TeacherPlan",
    "build_objective",
    "default_attention_map",
    "plan_teacher",
]


@dataclass
class TeacherPlan:
    """What the objective computes for one teacher (maps are ``{student layer: teacher layer(s)}``)."""

    role: str
    logits: str = "topk"  # "topk" | "sampled" | "" (no KD term)
    hidden_map: dict[int, int] = field(default_factory=dict)
    teacher_width: int | None = None
    t2v_map: dict[int, list[int]] = field(default_factory=dict)
    full_map: dict[int, list[int]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.logits or self.hidden_map or self.t2v_map or self.full_map)

    def to_dict(self) -> dict[str, Any]:
        return {"logits": self.logits, "hidden_map": self.hidden_map, "teacher_width": self.teacher_width,
                "t2v_map": self.t2v_map, "full_map": self.full_map}


def default_attention_map(role: str, kind: str, student_layers: int, teacher_layers: Sequence[int]) -> dict[int, list[int]]:
    """Drive-KD's student-layer choice (see the module docstring)."""
    t = sorted(teacher_layers)
    if not t:
        return {}
    if kind == "t2v":
        return {0 if role == "perception" else max(student_layers - 2, 0): t}
    return group_teacher_layers(list(range(max(student_layers - 1, 1))), t)


def plan_teacher(role: str, signals: Any, cfg: LossConfig, *, student_layers: int, teacher_width: int | None,
                 teacher_depth: int | None = None) -> TeacherPlan:
    """Decide a teacher's terms from its cache's ``SignalConfig`` and the loss config."""
    plan = TeacherPlan(role, logits=signals.logits if cfg.kd > 0 else "")
    if cfg.hidden > 0 and signals.hidden_layers:
        plan.hidden_map = dict(cfg.hidden_layer_map.get(role) or
                               layer_map(student_layers, signals.hidden_layers, teacher_depth))
        plan.teacher_width = teacher_width
        bad = {s: t for s, t in plan.hidden_map.items() if t not in signals.hidden_layers or not 0 <= s <= student_layers}
        if bad:
            raise ValueError(f"teacher {role!r}: hidden layer map entries {bad} need student layers in 0..{student_layers}"
                             f" and cached teacher layers {list(signals.hidden_layers)}")
    if cfg.attention > 0 and signals.attention_layers:
        for kind in signals.attention_kinds:
            m = cfg.attention_layer_map.get(role) or default_attention_map(role, kind, student_layers,
                                                                           signals.attention_layers)
            m = {int(s): [int(t) for t in ts] for s, ts in m.items()}
            bad = {s: ts for s, ts in m.items()
                   if not ts or not 0 <= s < student_layers or any(t not in signals.attention_layers for t in ts)}
            if bad:
                raise ValueError(f"teacher {role!r}: {kind} attention map entries {bad} need student layers in "
                                 f"0..{student_layers - 1} and cached teacher layers {list(signals.attention_layers)}")
            setattr(plan, f"{kind}_map", m)
    return plan


def build_objective(cfg: LossConfig, sources: Mapping[str, Any], student: nn.Module) -> DistillObjective:
    """The objective for a student and its teachers (``data.TeacherSource``s): plans from each cache's
    signals, teacher hidden widths read from the cache's first sample, depths from its manifest."""
    from .student import student_dims

    n_layers, width = student_dims(student)
    plans = {}
    for role, src in sources.items():
        hidden_width = None
        if src.signals.hidden_layers and len(src.reader):
            first = src.reader.get(src.reader.sample_ids[0])
            hidden_width = int(first.hidden[src.signals.hidden_layers[0]].shape[1])
        plans[role] = plan_teacher(role, src.signals, cfg, student_layers=n_layers, teacher_width=hidden_width,
                                   teacher_depth=src.teacher_depth if src.signals.hidden_layers else None)
    return DistillObjective(cfg, plans, student_width=width)


@dataclass
class LossBreakdown:
    """The named losses of one batch and their parts.

    ``losses``: ``{"ce": CE, role: L_r}`` with graphs (the inputs of loss weights and AGP).
    ``terms``: detached parts for logging (``ce``, ``kd/<role>``, ``hidden/<role>``,
    ``attn/<role>`` and per layer ``attn_<kind>/<role>/L<student layer>``). ``teacher_weights``: ``[B, n_teachers]`` mixing
    weights the batch used (columns in teacher order).
    """

    losses: dict[str, Tensor]
    terms: dict[str, float]
    teacher_weights: Tensor

    def total(self, weights: Mapping[str, float | Tensor]) -> Tensor:
        """``sum_i weights[i] * losses[i]`` over the named losses."""
        out = None
        for name, loss in self.losses.items():
            term = weights[name] * loss
            out = term if out is None else out + term
        return out


class DistillObjective(nn.Module):
    """Holds the hidden-state projectors and computes ``LossBreakdown`` from student outputs."""

    def __init__(self, cfg: LossConfig, plans: Mapping[str, TeacherPlan], *, student_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.plans = dict(plans)
        self.roles = list(self.plans)
        self.projectors = nn.ModuleDict({
            role: HiddenProjector(student_width, p.teacher_width, sorted(p.hidden_map))
            for role, p in self.plans.items() if p.hidden_map
        })
        matrix = (resolve_mixing(cfg.mixing_matrix, self.roles) if cfg.mixing_matrix is not None
                  else mixing_matrix(self.roles, cfg.mixing_diag))  # a bad matrix fails here, before training
        self.register_buffer("mixing", matrix, persistent=False)

    @property
    def loss_names(self) -> list[str]:
        return ["ce"] + [r for r in self.roles if self.plans[r].active]

    @property
    def hidden_layers(self) -> list[int]:
        return sorted({s for p in self.plans.values() for s in p.hidden_map})

    @property
    def attention_layers(self) -> list[int]:
        return sorted({s for p in self.plans.values() for m in (p.t2v_map, p.full_map) for s in m})

    def fixed_weights(self) -> dict[str, float]:
        return {"ce": self.cfg.ce, **{r: 1.0 for r in self.loss_names[1:]}}

    def forward(self, out: StudentOutputs, batch: Mapping[str, Any]) -> LossBreakdown:
        cfg = self.cfg
        n_tok = batch["num_tokens"].to(out.logits.device)
        n = int(n_tok.sum())
        # One teacher has nothing to mix: it serves every sample (e.g. a text-only LLM distilled from
        # one cache over data of several capabilities), so an unmatched capability is no typo to flag.
        unknown = "uniform" if len(self.roles) == 1 else cfg.unknown_capability
        w = teacher_weights(batch["capabilities"], self.roles, self.mixing.cpu(), unknown=unknown)
        w = w.to(out.logits.device)
        row_sample = torch.repeat_interleave(torch.arange(len(n_tok), device=n_tok.device), n_tok)
        keys: dict[str, list[Tensor]] = {}  # per kind, each sample's student key columns (shared by teachers)
        ce = answer_ce_loss(out.logits, batch["targets"])
        losses, terms = {"ce": ce}, {"ce": float(ce.detach())}
        for j, role in enumerate(self.roles):
            plan, t = self.plans[role], batch["teachers"][role]
            parts: list[tuple[str, float, Tensor]] = []
            if plan.logits:
                per_row = self._kd_rows(out.logits, t, plan.logits)
                parts.append(("kd", cfg.kd, (w[row_sample, j] * per_row).sum() / n))
            if plan.hidden_map:
                # A sample's loss is the mean of its rows' losses, so the token-weighted batch term is the
                # row-weighted mean: one projection of the whole batch per layer.
                per_layer = []
                for s, tl in sorted(plan.hidden_map.items()):
                    per_row = hidden_state_loss(out.hidden[s], t["hidden"][tl], self.projectors[role][s],
                                                cfg.hidden_kind, reduction="none")
                    per_layer.append((w[row_sample, j] * per_row).sum() / n)
                parts.append(("hidden", cfg.hidden, torch.stack(per_layer).mean()))
            attn = []
            for kind, amap in (("t2v", plan.t2v_map), ("full", plan.full_map)):
                if amap and kind not in keys:
                    keys[kind] = self._key_columns(batch, kind, out.logits.device)
                for s, tls in sorted(amap.items()):
                    per_sample = self._attention(out, batch, t, kind, s, tls, keys[kind], role)
                    value = (w[:, j] * n_tok * per_sample).sum() / n
                    attn.append(value)
                    terms[f"attn_{kind}/{role}/L{s}"] = float(value.detach())
            if attn:
                parts.append(("attn", cfg.attention, torch.stack(attn).mean()))
            if not parts:
                continue
            total = None
            for name, weight, value in parts:
                terms[f"{name}/{role}"] = float(value.detach())
                total = weight * value if total is None else total + weight * value
            losses[role] = total
        return LossBreakdown(losses=losses, terms=terms, teacher_weights=w.detach())

    # ------------------------------------------------------------------ pieces

    def _kd_rows(self, logits: Tensor, t: Mapping[str, Tensor], kind: str) -> Tensor:
        cfg = self.cfg
        if kind == "sampled":
            return sampled_kd_loss(logits, t["ids"], t["counts"], t["logprobs"], temperature=cfg.temperature,
                                   reduction="none")
        return topk_kd_loss(logits, t["ids"], t["logprobs"], t["tail"], kind=cfg.kd_kind, beta=cfg.kd_beta,
                            temperature=cfg.temperature, tail=cfg.kd_tail, tail_temperature=cfg.tail_temperature,
                            reduction="none")

    @staticmethod
    def _key_columns(batch: Mapping[str, Any], kind: str, device: torch.device) -> list[Tensor]:
        """Each sample's student key columns of a ``kind`` map: its image tokens (t2v) or all its tokens."""
        lengths = batch["lengths"].tolist()
        if kind == "t2v":
            return [torch.nonzero(batch["image_mask"][b, :n], as_tuple=True)[0].to(device) for b, n in enumerate(lengths)]
        return [torch.arange(n, device=device) for n in lengths]

    @staticmethod
    def _attention(out: StudentOutputs, batch: Mapping[str, Any], t: Mapping[str, Any], kind: str, s: int,
                   tls: Sequence[int], cols: Sequence[Tensor], role: str) -> Tensor:
        """Per-sample attention-map MSE ``[B]``: the cached maps (mean over ``tls``) laid out like the
        student's padded maps, then ``padded_attention_map_loss`` over each sample's rows and keys."""
        student = out.attention_padded[s]  # [B, T_max, S]
        target = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
        mask = torch.zeros(student.shape, dtype=torch.bool, device=student.device)
        maps = t["attention_t2v" if kind == "t2v" else "attention_full"]
        for b, (t_b, c) in enumerate(zip(batch["num_tokens"].tolist(), cols)):
            cached = maps[tls[0]][b] if len(tls) == 1 else torch.stack([maps[tl][b] for tl in tls]).mean(0)
            if tuple(cached.shape) != (t_b, len(c)):
                raise ValueError(f"sample {batch['sample_ids'][b]!r}, teacher {role!r}: cached {kind} map "
                                 f"{tuple(cached.shape)} vs student {(t_b, len(c))}")
            target[b, :t_b, c] = cached.to(student.device, torch.float32)
            mask[b, :t_b, c] = True
        return padded_attention_map_loss(student, target, mask)
