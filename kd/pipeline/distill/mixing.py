"""Combining several teachers and losses: the capability mixing matrix, learnable loss weights, AGP.

Drive-KD keeps one teacher per capability (perception / reasoning / planning). Each sample's
question type picks a row of a mixing matrix (0.8 on the matching teacher), learnable weights
balance the CE and distillation losses with a floor on CE, and Asymmetric Gradient Projection
(AGP) removes the parts of distillation gradients that fight the CE gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "mixing_matrix",
    "resolve_mixing",
    "check_capabilities",
    "teacher_weights",
    "teacher_weight_rows",
    "lookup_teacher_weights",
    "LearnableLossWeights",
    "grad_norms",
    "per_loss_grads",
    "agp_project",
    "agp_combine",
    "assign_grads",
]


def mixing_matrix(roles: Sequence[str], diag: float = 0.8) -> Tensor:
    """``[n, n]`` matrix: row ``i`` gives the teacher weights for capability ``roles[i]``.

    ``diag`` goes to the teacher whose role matches, and ``1 - diag`` is split equally over the
    others (0.8 / 0.1 / 0.1 for three teachers). With a single teacher the matrix is ``[[1.0]]``.
    """
    n = len(roles)
    if n == 0 or len(set(roles)) != n:
        raise ValueError(f"roles must be non-empty and distinct, got {list(roles)}")
    if not 0.0 <= diag <= 1.0:
        raise ValueError(f"diag must lie in [0, 1], got {diag}")
    if n == 1:
        return torch.ones(1, 1)
    off = (1.0 - diag) / (n - 1)
    return torch.full((n, n), off) + torch.eye(n) * (diag - off)


MixingSpec = Tensor | Sequence[Sequence[float]] | Mapping[str, Mapping[str, float]]


def resolve_mixing(spec: MixingSpec, roles: Sequence[str]) -> Tensor:
    """A validated ``[n, n]`` mixing matrix from a nested list (rows and columns in ``roles`` order)
    or a named mapping ``{capability: {teacher role: weight}}`` (absent entries are 0).

    Every problem is an error naming the entry at fault: a row or column that names no teacher
    role, a missing row, a wrong shape, a negative or non-finite weight, an all-zero row or a row
    that does not sum to 1. Run it when a run is configured, so a bad matrix never reaches training.
    """
    roles = list(roles)
    if isinstance(spec, Mapping):
        unknown_rows = [c for c in spec if c not in roles]
        if unknown_rows:
            raise ValueError(f"mixing matrix rows {unknown_rows} name no teacher role; rows are capabilities "
                             f"served by the teachers {roles}")
        missing = [r for r in roles if r not in spec]
        if missing:
            raise ValueError(f"mixing matrix has no row for capabilities {missing} (teachers {roles})")
        rows = []
        for cap in roles:
            row = spec[cap]
            if not isinstance(row, Mapping):
                raise ValueError(f"mixing matrix row {cap!r} must map teacher roles to weights, got {row!r}")
            unknown_cols = [t for t in row if t not in roles]
            if unknown_cols:
                raise ValueError(f"mixing matrix row {cap!r} names teachers {unknown_cols} that are not among {roles}")
            rows.append([_weight(row.get(t, 0.0), cap, t) for t in roles])
        matrix = torch.tensor(rows, dtype=torch.float32)
    elif isinstance(spec, Tensor):
        matrix = spec.float()
    else:
        rows = list(spec)
        if any(isinstance(r, (str, bytes)) or not isinstance(r, Sequence) for r in rows):
            raise ValueError(f"mixing matrix must be a list of rows (one per capability in {roles}), got {spec!r}")
        if len(rows) != len(roles) or any(len(r) != len(roles) for r in rows):
            raise ValueError(f"mixing matrix has {len(rows)} row(s) of length(s) {[len(r) for r in rows]} but there "
                             f"are {len(roles)} teachers {roles}: "
                             f"expected [{len(roles)}, {len(roles)}] (row = capability, column = teacher, "
                             "both in teachers order)")
        matrix = torch.tensor([[_weight(v, roles[i], roles[j]) for j, v in enumerate(r)] for i, r in enumerate(rows)],
                              dtype=torch.float32)
    _check_matrix(roles, matrix)
    return matrix


def _weight(value: object, capability: str, teacher: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"mixing matrix entry [capability {capability!r}, teacher {teacher!r}] must be a number, "
                         f"got {value!r}")
    return float(value)


def check_capabilities(capabilities: Iterable[str], roles: Sequence[str],
                       unknown: Literal["error", "uniform"] = "error", source: str = "") -> None:
    """Refuse, before training, samples whose capability has no mixing-matrix row (unless ``uniform``).

    The same rule ``teacher_weights`` applies per batch, checked once over the whole dataset so a
    typo such as ``"Planning"`` stops the run before its first step, naming the capability.
    """
    if unknown == "uniform":
        return
    counts: dict[str, int] = {}
    for c in capabilities:
        if c not in roles:
            counts[c] = counts.get(c, 0) + 1
    if counts:
        listed = ", ".join(f"{c!r} ({n} sample(s))" for c, n in sorted(counts.items()))
        at = f" in {source}" if source else ""
        raise ValueError(f"capabilities {listed}{at} have no teacher: the mixing matrix rows are the teacher roles "
                         f"{list(roles)}; fix the data or set loss.unknown_capability=uniform")


def _check_matrix(roles: Sequence[str], matrix: Tensor) -> None:
    n = len(roles)
    if len(set(roles)) != n or n == 0:
        raise ValueError(f"teacher roles must be non-empty and distinct, got {list(roles)}")
    if matrix.ndim != 2 or tuple(matrix.shape) != (n, n):
        raise ValueError(
            f"mixing matrix has shape {tuple(matrix.shape)} but there are {n} teachers {list(roles)}: "
            f"expected [{n}, {n}] (row = capability in roles order, column = teacher)"
        )
    for i, j in (~torch.isfinite(matrix) | (matrix < 0)).nonzero().tolist():
        value = float(matrix[i, j])
        what = "not finite" if not math.isfinite(value) else "negative"
        raise ValueError(f"mixing matrix entries must be finite and non-negative: entry [capability {roles[i]!r}, "
                         f"teacher {roles[j]!r}] = {value} is {what}")
    for i in (matrix == 0).all(dim=1).nonzero().flatten().tolist():
        raise ValueError(f"mixing matrix row {roles[i]!r} is all zeros: samples of capability {roles[i]!r} would learn "
                         "from no teacher (rows must sum to 1)")
    sums = matrix.double().sum(dim=1)
    bad = [(roles[i], round(float(s), 6)) for i, s in enumerate(sums) if abs(float(s) - 1.0) > 1e-5]
    if bad:
        raise ValueError(f"mixing matrix rows must sum to 1; rows (capability, sum) off: {bad}")


def teacher_weights(
    capabilities: Sequence[str],
    roles: Sequence[str],
    matrix: Tensor,
    *,
    unknown: Literal["error", "uniform"] = "error",
) -> Tensor:
    """Per-sample teacher weights ``[B, n_teachers]``: the matrix row of each sample's capability.

    ``roles[j]`` is teacher ``j``'s capability, and it also names matrix row ``j``. A capability
    outside ``roles`` raises ``ValueError`` by default, because a silent fallback would hide a typo
    such as ``"Planning"``. Pass ``unknown="uniform"`` to give such samples ``1/n`` per teacher.
    The matrix is validated first: its shape must be ``[n, n]``, its entries non-negative, and its
    rows must sum to 1.
    """
    return lookup_teacher_weights(capabilities, roles, teacher_weight_rows(roles, matrix), unknown=unknown)


def teacher_weight_rows(roles: Sequence[str], matrix: Tensor) -> Tensor:
    """The validated matrix as float32 ``[n + 1, n]`` lookup rows, the last one uniform (``1/n``: the
    fallback for unknown capabilities). Build once, look up per batch (``lookup_teacher_weights``)."""
    _check_matrix(roles, matrix)
    n = len(roles)
    return torch.cat([matrix.float(), torch.full((1, n), 1.0 / n, device=matrix.device)])


def lookup_teacher_weights(
    capabilities: Sequence[str],
    roles: Sequence[str],
    rows: Tensor,
    *,
    unknown: Literal["error", "uniform"] = "error",
) -> Tensor:
    """``teacher_weights`` from rows already checked by ``teacher_weight_rows`` (the per-batch part)."""
    if unknown not in ("error", "uniform"):
        raise ValueError(f"unknown must be 'error' or 'uniform', got {unknown!r}")
    index = {r: i for i, r in enumerate(roles)}
    missing = sorted({c for c in capabilities if c not in index})
    if missing and unknown == "error":
        raise ValueError(f"unknown capabilities {missing}; teachers cover {list(roles)} (or pass unknown='uniform')")
    idx = torch.tensor([index.get(c, len(roles)) for c in capabilities], dtype=torch.long)
    return rows[idx.to(rows.device)]


class LearnableLossWeights(nn.Module):
    """GradNorm-like learnable loss weights that sum to 1 with ``w_ce >= ce_floor`` (Drive-KD: 0.6).

    ``w = (1 - floor) * softmax(theta)``, plus ``floor`` added to the CE entry. The weights are
    positive and sum to 1, CE keeps at least ``floor``, and the map stays differentiable, so no
    clamping ever stalls the gradient. The weights enter the training loss detached (``combine``).
    They move only through ``gradnorm_objective``, the L1 GradNorm objective
    ``sum_i |w_i G_i - target_i|``. There ``G_i = ||grad L_i||`` is the norm of the unweighted
    loss's gradient on the shared parameters, and
    ``target_i = mean_j(w_j G_j) * (r_i / mean_j r_j) ** alpha`` with ``r_i = L_i / L_i(first call)``;
    targets are constants. Step it with its own optimiser. ``alpha = 0`` (the Drive-KD default)
    equalises the weighted gradient norms.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        ce_key: str = "ce",
        ce_floor: float = 0.6,
        alpha: float = 0.0,
        init: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.names = list(names)
        if len(set(self.names)) != len(self.names) or ce_key not in self.names:
            raise ValueError(f"names must be distinct and include ce_key {ce_key!r}, got {self.names}")
        if not 0.0 <= ce_floor < 1.0:
            raise ValueError(f"ce_floor must lie in [0, 1), got {ce_floor}")
        self.ce_key, self.ce_floor, self.alpha = ce_key, float(ce_floor), float(alpha)
        self.ce_index = self.names.index(ce_key)
        theta = torch.zeros(len(self.names))
        if init is not None:
            # Invert the weight map so that forward() starts at the requested weights.
            w = torch.tensor([float(init.get(n, 0.0)) for n in self.names])
            if (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-5 or float(w[self.ce_index]) <= ce_floor:
                raise ValueError(f"init weights must be positive, sum to 1 and give CE > {ce_floor}: {dict(init)}")
            w[self.ce_index] -= ce_floor
            theta = torch.log(w / (1.0 - ce_floor))
        self.theta = nn.Parameter(theta)
        self.register_buffer("initial_losses", torch.full((len(self.names),), float("nan")))

    def forward(self) -> Tensor:
        """The current weights ``[n]`` in ``names`` order."""
        w = (1.0 - self.ce_floor) * torch.softmax(self.theta, dim=0)
        return w + self.ce_floor * nn.functional.one_hot(torch.tensor(self.ce_index), len(self.names)).to(w)

    def as_dict(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self().detach())}

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``sum_i w_i L_i`` with the weights detached (the student loss must not train the weights)."""
        w = self().detach()
        terms = [w[i].to(losses[n].device) * losses[n] for i, n in enumerate(self.names)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def gradnorm_objective(self, losses: Mapping[str, Tensor], norms: Mapping[str, Tensor | float]) -> Tensor:
        """The L1 GradNorm objective for the weights. Losses and norms are treated as constants."""
        missing = [n for n in self.names if n not in losses or n not in norms]
        if missing:
            raise KeyError(f"losses/norms missing for {missing}")
        dev = self.theta.device
        cur = torch.stack([torch.as_tensor(losses[n]).detach().float().to(dev) for n in self.names])
        g = torch.stack([torch.as_tensor(norms[n]).detach().float().to(dev) for n in self.names])
        with torch.no_grad():
            unset = torch.isnan(self.initial_losses)
            self.initial_losses[unset] = cur[unset]
        ratio = cur / self.initial_losses.clamp_min(1e-12)
        wg = self() * g
        target = (wg.mean() * (ratio / ratio.mean().clamp_min(1e-12)) ** self.alpha).detach()
        return (wg - target).abs().sum()


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Dot product over a list of tensors, in at least float32 (float64 kept)."""
    dt = torch.promote_types(a[0].dtype, torch.float32)
    return sum(((x.to(dt) * y.to(dt)).sum() for x, y in zip(a, b)), torch.zeros((), dtype=dt, device=a[0].device))


def grad_norms(grads_by_loss: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
    """L2 norm over all parameters of each loss's gradient (the ``G_i`` of GradNorm)."""
    return {k: _dot(g, g).sqrt() for k, g in grads_by_loss.items()}


def per_loss_grads(
    losses: Mapping[str, Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
) -> dict[str, list[Tensor]]:
    """Separate gradients of each loss w.r.t. ``params``. Unused parameters get zeros.

    The graph is retained between losses and freed after the last one, unless
    ``retain_graph=True``. A loss without a graph, such as a skipped term, gets zero gradients.
    """
    params = list(params)
    items = list(losses.items())
    out: dict[str, list[Tensor]] = {}
    for i, (name, loss) in enumerate(items):
        if not loss.requires_grad:
            out[name] = [torch.zeros_like(p) for p in params]
            continue
        keep = retain_graph or i < len(items) - 1
        gs = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
        out[name] = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]
    return out


def _project_off(g: list[Tensor], anchor: Sequence[Tensor]) -> list[Tensor]:
    """Remove from ``g`` its component along ``anchor`` only when they conflict (dot < 0)."""
    coef = _dot(g, anchor).clamp(max=0.0) / _dot(anchor, anchor).clamp_min(1e-20)
    return [x - (coef * a.to(coef.dtype)).to(x.dtype) for x, a in zip(g, anchor)]


def agp_project(
    grads_by_loss: Mapping[str, Sequence[Tensor]],
    ce_key: str = "ce",
    *,
    generator: torch.Generator | None = None,
) -> dict[str, list[Tensor]]:
    """Asymmetric Gradient Projection. Returns the projected gradient of each loss; CE is returned unchanged.

    Stage 1 (asymmetric): each capability gradient that conflicts with CE (negative dot) loses
    its component along the CE gradient. CE is the anchor and is never modified. Stage 2
    (PCGrad): each stage-1 capability gradient is projected off every other stage-1 capability
    gradient it conflicts with, visited in dict order (random order with ``generator``, as
    PCGrad and Drive-KD shuffle). Conflict-free gradients come back bit-identical. Stage 2
    cannot bring back a conflict with CE: it only adds non-negative multiples of gradients whose
    dot with CE is already ``>= 0``. Unlike Drive-KD's code, which sums ``CE + capability`` once
    per capability, CE is counted exactly once in ``agp_combine``. Pass gradients of the losses
    already weighted by the mixing matrix and loss weights.
    """
    if ce_key not in grads_by_loss:
        raise KeyError(f"AGP needs the anchor gradient {ce_key!r}; got {list(grads_by_loss)}")
    ce = list(grads_by_loss[ce_key])
    caps = [k for k in grads_by_loss if k != ce_key]
    for k in caps:
        if len(grads_by_loss[k]) != len(ce):
            raise ValueError(f"gradient list for {k!r} has {len(grads_by_loss[k])} tensors, CE has {len(ce)}")
    stage1 = {k: _project_off(list(grads_by_loss[k]), ce) for k in caps}
    order = list(caps)
    if generator is not None and len(order) > 1:
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    out: dict[str, list[Tensor]] = {ce_key: ce}
    for ci in order:
        g = stage1[ci]
        for cj in order:
            if cj != ci:
                g = _project_off(g, stage1[cj])
        out[ci] = g
    return out


def agp_combine(
    grads_by_loss: Mapping[str, Sequence[Tensor]], ce_key: str = "ce", *, generator: torch.Generator | None = None
) -> list[Tensor]:
    """The total AGP gradient per parameter: the CE gradient plus every projected capability gradient."""
    projected = agp_project(grads_by_loss, ce_key, generator=generator)
    return [torch.stack(list(parts)).sum(0) for parts in zip(*projected.values())]


def assign_grads(params: Sequence[Tensor], grads: Sequence[Tensor], *, accumulate: bool = True) -> None:
    """Write combined gradients into ``p.grad``, adding to what is there when accumulating."""
    for p, g in zip(params, grads):
        g = g.to(p.dtype)
        p.grad = g.clone() if (p.grad is None or not accumulate) else p.grad + g
