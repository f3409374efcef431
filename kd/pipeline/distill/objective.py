"""The distillation objective: CE plus, per teacher, logit KD, hidden-state and attention-map terms.

Weighting, one rule for every term: a batch term is a token-weighted mean over the batch in which
each answer token carries its sample's mixing weight for that teacher,

    term_r = sum_b w[b, r] * T_b * loss(sample b) / N,       N = sum_b T_b,

where ``loss(sample b)`` is the library loss (``kd.pipeline.distill.losses``) on sample ``b``'s rows (its
mean over rows), ``T_b`` its answer tokens and ``w[b, r]`` the mixing-matrix entry of the sample's
capability for teacher ``r`` (a single teacher has ``w = 1`` for every sample, whatever its
capability). For logit KD this is exactly the row-weighted mean of the per-row losses. Hidden
and attention terms average over their mapped layers. A teacher's loss is

    L_r = kd * KD_r + hidden * H_r + attention * (mean over t2v and full pairs of A_r),

with only the terms whose weight is > 0 and whose signal the cache holds. The named losses
``{"ce": CE, role: L_r}`` are what fixed weights (``ce`` for CE, 1 for each teacher), learnable
weights and AGP combine.

Each kind of term is computed for all teachers at once (one stacked top-k KD, one batched
projection for all hidden pairs, one gather for all attention maps), then split per teacher: on
a small student a loop per teacher and layer costs more than the arithmetic (one op and one
autograd node each).

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

from kd.pipeline.distill.losses import (
    HiddenProjector,
    answer_ce_loss,
    group_teacher_layers,
    layer_map,
    sampled_kd_loss,
    segment_attention_map_loss,
    stacked_hidden_state_rows,
    student_log_probs,
    topk_kd_loss,
)
from kd.pipeline.distill.mixing import (
    lookup_teacher_weights,
    mixing_matrix,
    resolve_mixing,
    teacher_weight_rows,
)

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
            term = _times(weights[name], loss)
            out = term if out is None else out + term
        return out


def _times(weight: float | Tensor, x: Tensor) -> Tensor:
    """``weight * x``, without the op (and its autograd node) for a plain weight of 1."""
    return x if isinstance(weight, (int, float)) and weight == 1.0 else weight * x


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
        self.register_buffer("weight_rows", teacher_weight_rows(self.roles, matrix), persistent=False)

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
        device = out.logits.device
        n_tok = batch["num_tokens"].to(device)
        n = int(n_tok.sum())
        # One teacher has nothing to mix: it serves every sample (e.g. a text-only LLM distilled from
        # one cache over data of several capabilities), so an unmatched capability is no typo to flag.
        unknown = "uniform" if len(self.roles) == 1 else cfg.unknown_capability
        w = lookup_teacher_weights(batch["capabilities"], self.roles, self.weight_rows, unknown=unknown).to(device)
        # Row and sample weights with the 1/N of the token-weighted mean folded in: [N, R] and [B, R].
        row_w = w[torch.repeat_interleave(torch.arange(len(n_tok), device=device), n_tok)] / n
        # One log-softmax for CE and every KD term (its [N, V] output is saved for backward once).
        shared = any(self.plans[r].logits for r in self.roles)
        logits = student_log_probs(out.logits) if shared else out.logits
        ce = answer_ce_loss(logits, batch["targets"], normalized=shared)
        parts = [("kd", cfg.kd, self._kd_terms(logits, batch, row_w)),
                 ("hidden", cfg.hidden, self._hidden_terms(out, batch, row_w)),
                 ("attn", cfg.attention, self._attention_terms(out, batch, w * n_tok[:, None] / n))]
        parts = [(name, weight, pairs, pairs.per_role(len(self.roles))) for name, weight, pairs in parts if pairs.roles]
        total = None
        for _, weight, _, per_role in parts:
            total = _times(weight, per_role) if total is None else total + _times(weight, per_role)
        active = sorted({j for *_, pairs, _ in parts for j in pairs.roles})
        losses = {"ce": ce}
        if total is not None:
            by_role = total.unbind()
            losses.update({self.roles[j]: by_role[j] for j in active})
        # Logged terms: one transfer of every detached value.
        names = ["ce"] + [f"{name}/{self.roles[j]}" for name, _, pairs, _ in parts for j in sorted(set(pairs.roles))]
        names += [label for *_, pairs, _ in parts for label in pairs.labels]
        values = [ce.detach().reshape(1)] + [per_role.detach()[sorted(set(pairs.roles))] for *_, pairs, per_role in parts]
        values += [pairs.values.detach() for *_, pairs, _ in parts if pairs.labels]
        terms = dict(zip(names, torch.cat(values).tolist()))
        return LossBreakdown(losses=losses, terms=terms, teacher_weights=w.detach())

    # ------------------------------------------------------------------ pieces

    def _kd_terms(self, log_probs: Tensor, batch: Mapping[str, Any], row_w: Tensor) -> _Pairs:
        """One KD term per teacher with a logit signal: the teachers of one kind (top-k, sampled)
        stacked into one loss call on the student's log-probs, each row weighted by its sample's
        mixing weight."""
        roles, values = [], []
        for kind, keys in (("topk", ("ids", "logprobs", "tail")), ("sampled", ("ids", "logprobs", "counts"))):
            js = [j for j, r in enumerate(self.roles) if self.plans[r].logits == kind]
            if js:
                stacked = _stack_targets([batch["teachers"][self.roles[j]] for j in js], keys)
                per_row = self._kd_rows(log_probs, stacked, kind)  # [R', N]
                roles += js
                values.append((row_w[:, js].T * per_row).sum(-1))
        return _Pairs(roles, torch.cat(values) if values else log_probs.new_zeros(0))

    def _kd_rows(self, log_probs: Tensor, t: Mapping[str, Tensor], kind: str) -> Tensor:
        """Per-row KD losses ``[N]`` of one teacher's targets, or ``[R, N]`` of stacked ones, from the
        student's log-probs."""
        cfg = self.cfg
        if kind == "sampled":
            return sampled_kd_loss(log_probs, t["ids"], t["counts"], t["logprobs"], temperature=cfg.temperature,
                                   reduction="none", normalized=True)
        return topk_kd_loss(log_probs, t["ids"], t["logprobs"], t["tail"], kind=cfg.kd_kind, beta=cfg.kd_beta,
                            temperature=cfg.temperature, tail=cfg.kd_tail, tail_temperature=cfg.tail_temperature,
                            reduction="none", normalized=True)

    def _hidden_terms(self, out: StudentOutputs, batch: Mapping[str, Any], row_w: Tensor) -> _Pairs:
        """One term per (teacher, mapped layer): a sample's loss is the mean of its rows' losses, so the
        token-weighted batch term is the row-weighted mean. Pairs of one teacher width are projected
        together (``stacked_hidden_state_rows``)."""
        pairs = [(j, s, tl) for j, r in enumerate(self.roles) for s, tl in sorted(self.plans[r].hidden_map.items())]
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for j, s, tl in pairs:
            groups.setdefault(self.projectors[self.roles[j]][s].out_features, []).append((j, s, tl))
        roles, values = [], []
        for group in groups.values():
            per_row = stacked_hidden_state_rows(
                [out.hidden[s] for _, s, _ in group], [batch["teachers"][self.roles[j]]["hidden"][tl] for j, _, tl in group],
                [self.projectors[self.roles[j]][s] for j, s, _ in group], self.cfg.hidden_kind)  # [P, N]
            js = [j for j, _, _ in group]
            roles += js
            values.append((row_w[:, js].T * per_row).sum(-1))
        return _Pairs(roles, torch.cat(values) if values else out.logits.new_zeros(0))

    def _attention_terms(self, out: StudentOutputs, batch: Mapping[str, Any], sample_w: Tensor) -> _Pairs:
        """One term per (teacher, kind, student layer): per-sample MSE between the student's padded maps
        and the cached maps (mean over the mapped teacher layers), weighted by ``sample_w`` ``[B, R]``
        (mixing weight x answer tokens / N). All pairs go through one ``segment_attention_map_loss``."""
        pairs = [(j, kind, s, tls) for j, r in enumerate(self.roles)
                 for kind, amap in (("t2v", self.plans[r].t2v_map), ("full", self.plans[r].full_map))
                 for s, tls in sorted(amap.items())]
        if not pairs:
            return _Pairs([], out.logits.new_zeros(0))
        layers = sorted({s for _, _, s, _ in pairs})
        maps = torch.stack([out.attention_padded[s] for s in layers])  # [L, B, T_max, S]
        b = len(sample_w)
        grid = (b, int(batch["num_tokens"].max()), batch["input_ids"].shape[1])
        if tuple(maps.shape[1:]) != grid:
            raise ValueError(f"student attention maps {tuple(maps.shape[1:])} do not match the batch layout {grid}")
        index, segment, target = [], [], []
        for p, (j, kind, s, tls) in enumerate(pairs):
            layout, cached = batch["attention_layout"][kind], batch["teachers"][self.roles[j]][f"attention_{kind}"]
            index.append(layout["index"] + layers.index(s) * maps[0].numel())
            segment.append(layout["sample"] + p * b)
            target.append(cached[tls[0]] if len(tls) == 1 else torch.stack([cached[tl] for tl in tls]).mean(0))
        per_sample = segment_attention_map_loss(maps, torch.cat(target), torch.cat(index).to(maps.device),
                                                torch.cat(segment).to(maps.device), len(pairs) * b)
        js = [j for j, *_ in pairs]
        values = (sample_w[:, js].T * per_sample.view(len(pairs), b)).sum(-1)
        labels = [f"attn_{kind}/{self.roles[j]}/L{s}" for j, kind, s, _ in pairs]
        return _Pairs(js, values, labels)


@dataclass
class _Pairs:
    """Batch terms of one kind: ``values[p]`` belongs to teacher ``roles[p]`` (``labels``: names to log
    each value under, if any)."""

    roles: list[int]
    values: Tensor
    labels: list[str] = field(default_factory=list)

    def per_role(self, n_roles: int) -> Tensor:
        """``[n_roles]``: the mean of each teacher's values (0 for a teacher without any)."""
        per = len(self.roles) // n_roles
        if self.roles == [j for j in range(n_roles) for _ in range(per)]:  # the usual layout: a view, no scatter
            return self.values if per == 1 else self.values.view(n_roles, per).mean(1)
        idx = torch.tensor(self.roles, device=self.values.device)
        count = torch.bincount(idx, minlength=n_roles).clamp_min(1).to(self.values.dtype)
        return self.values.new_zeros(n_roles).index_add(0, idx, self.values) / count


_PAD = {"ids": -1, "logprobs": float("-inf"), "counts": 0.0}


def _stack_targets(entries: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> dict[str, Tensor]:
    """Teachers' logit targets stacked ``[R, N, k]`` (tails ``[R, N]``), padded to the widest ``k``
    (padding is what the losses ignore: id -1, log-prob -inf, count 0)."""
    out = {}
    for key in keys:
        xs = [e[key] for e in entries]
        if key in _PAD:
            k = max(x.shape[-1] for x in xs)
            xs = [x if x.shape[-1] == k else torch.nn.functional.pad(x, (0, k - x.shape[-1]), value=_PAD[key])
                  for x in xs]
        out[key] = torch.stack(xs)
    return out
