"""Distillation losses over cached teacher signals, one shape convention for every training loop.

Every token-level input is flattened over valid answer tokens: row ``n`` is one position that
predicts an answer token (see ``signals.py``). Student logits are ``[N, V]``; cached teacher
top-k ids are ``[N, k]`` long with ``-1`` padding, their raw log-probs ``[N, k]`` (temperature 1,
``-inf`` padding) and the log tail mass outside the top-k ``[N]`` (``-inf`` when none). The KD
losses also take several teachers at once, stacked in leading dims (``[R, N, k]``, tail ``[R, N]``):
the student's log-softmax is then computed and gathered once for all of them, which on a small
student is most of the cost of a per-teacher loop (one op and one autograd node per teacher).

Temperature on a top-k cache (``topk_kd_loss``). The cache holds ``k + 1`` *buckets* per
row: the top-k tokens and one tail bucket with log-mass ``tail``. The teacher at temperature ``T``
is ``softmax(b / T)`` over those ``k + 1`` bucket log-probs ``b``, i.e. the tail is scaled as if
it were one pseudo-token. This is exact when the top-k covers the vocabulary. Otherwise, for
``T > 1`` it gives the tail less mass than the true tempered tail (``sum p_j^(1/T) >= (sum
p_j)^(1/T)``) and for ``T < 1`` more. By default (``tail_temperature="bucket"``) the student is
bucketed the same way: its temperature-1 log-probs at the teacher ids plus its exact
temperature-1 tail, and then the same ``softmax(b / T)``. Because ``b -> softmax(b / T)`` is a
bijection, the loss is zero exactly when the student's buckets equal the teacher's, at every
``T``. ``tail_temperature="student_exact"`` uses ``log_softmax(z / T)`` for the student instead,
with the exact tempered student tail. That is the textbook student side, but for ``T != 1`` and
``k < V`` it pulls a student that already matches the teacher away from it. Both agree when
``k = V``. A teacher tail below ``TAIL_LOGMASS_FLOOR`` (``log 1e-6``) is raised to it wherever the
student has mass outside the top-k: the engines write ``-inf`` for tails under 1e-6, which would
make reverse KL infinite. All KD losses are multiplied by ``T**2`` (Hinton et al.)
so that gradient magnitudes stay comparable across temperatures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.pipeline.distill.student_tail import student_tail_logmass

__all__ = [
    "HiddenProjector",
    "answer_ce_loss",
    "attention_map_loss",
    "default_attention_layers",
    "group_mean_maps",
    "group_teacher_layers",
    "hidden_state_loss",
    "layer_map",
    "padded_attention_map_loss",
    "sampled_kd_loss",
    "segment_attention_map_loss",
    "stacked_hidden_state_rows",
    "student_log_probs",
    "topk_kd_loss",
]

NEG_INF = float("-inf")
# Floor for the teacher's tail log-mass when the student still has mass outside the top-k. The
# engines write tail = -inf once the tail mass is below what fp32 top-k log-probs resolve
# (engines.base.TAIL_EPS = 1e-6), so the true tail lies in [0, 1e-6]. Reading it as 1e-6 keeps
# reverse KL / JSD finite and changes forward KL by ~1e-5 at most.
TAIL_LOGMASS_FLOOR = math.log(1e-6)


def _safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """logsumexp that returns -inf for all -inf slices without NaN gradients."""
    m = x.amax(dim=dim, keepdim=True)
    empty = torch.isneginf(m)
    out = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), dim=dim, keepdim=True)
    return torch.where(empty, m, out).squeeze(dim)


def _normalise(logits: Tensor) -> Tensor:
    """log_softmax along the last dim, safe for padded (-inf) entries and empty rows."""
    return logits - _safe_logsumexp(logits, -1).unsqueeze(-1)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Row-wise KL(p || q) with the 0 * log 0 = 0 convention and clean gradients."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def _scale(x: Tensor, t: float) -> Tensor:
    """``x / t``, skipped at ``t = 1`` (same values, one op and autograd node less)."""
    return x if t == 1.0 else x / t


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bf16 inputs (log-space sums need it), float64 kept as is."""
    return torch.promote_types(x.dtype, torch.float32)


def _log_softmax(z: Tensor, t: float, normalized: bool) -> Tensor:
    """``log_softmax(z / t)``; no op when ``z`` already holds log-probs and ``t = 1``."""
    return z if normalized and t == 1.0 else F.log_softmax(_scale(z, t), dim=-1)


def student_log_probs(student_logits: Tensor) -> Tensor:
    """``log_softmax`` of student logits in float32 (or wider), to compute once and pass with
    ``normalized=True`` to the CE and every KD loss: one ``[N, V]`` tensor saved for backward, not one each."""
    return F.log_softmax(student_logits.to(_compute_dtype(student_logits)), dim=-1)


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.mean() if per_row.numel() else per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_ids(student_logits: Tensor, ids: Tensor, other: Tensor, what: str) -> None:
    """``ids`` / ``other``: ``[..., N, k]`` (leading dims = teachers) against student logits ``[N, V]``."""
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    if ids.ndim < 2 or ids.shape != other.shape or ids.shape[-2] != student_logits.shape[0]:
        raise ValueError(
            f"ids {tuple(ids.shape)} / {what} {tuple(other.shape)} must both be [..., N={student_logits.shape[0]}, k]"
        )
    if ids.numel() and int(ids.max()) >= student_logits.shape[1]:
        raise ValueError(f"teacher id {int(ids.max())} outside the student vocabulary of {student_logits.shape[1]}")


def _gather_ids(s: Tensor, ids: Tensor) -> Tensor:
    """``s[n, ids[..., n, j]]`` for student rows ``s`` ``[N, V]`` and ids ``[..., N, k]``: one gather over
    all leading (teacher) dims, whose backward is one scatter into ``[N, V]``."""
    if ids.ndim == 2:
        return s.gather(1, ids)
    lead, (n, k) = ids.shape[:-2], ids.shape[-2:]
    flat = ids.movedim(-2, 0).reshape(n, -1)  # [N, R * k]
    return s.gather(1, flat).reshape(n, *lead, k).movedim(0, -2)


def topk_kd_loss(
    student_logits: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    t_tail: Tensor,
    *,
    kind: Literal["forward", "reverse", "jsd"] = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: Literal["bucket", "renorm"] = "bucket",
    tail_temperature: Literal["bucket", "student_exact"] = "bucket",
    reduction: Literal["mean", "none"] = "mean",
    normalized: bool = False,
) -> Tensor:
    """KD against a top-k + tail cache, on k + 1 buckets (``tail="bucket"``) or the renormalised top-k.

    ``kind``: ``forward`` = KL(teacher || student), ``reverse`` = KL(student || teacher),
    ``jsd`` = generalised JSD of GKD (Agarwal et al.): ``beta * KL(P || M) + (1 - beta) * KL(Q || M)``
    with ``M = beta * P + (1 - beta) * Q``, P the teacher, Q the student, ``0 < beta < 1``.
    ``tail="renorm"`` drops the tail bucket and renormalises both sides over the top-k, which is
    exact for the truncated teacher at any ``T``. See the module docstring for the temperature and
    tail definitions. Returns the mean over rows times ``T**2``, or ``[N]`` with ``reduction="none"``.
    Several teachers stacked in leading dims (ids ``[R, N, k]``, tail ``[R, N]``) give ``[R, N]``
    (``"mean"``: over all of them). Never materialises a dense teacher or an ``[N, k, V]`` tensor.
    ``normalized=True``: ``student_logits`` are already log-probs (one ``log_softmax`` shared with the
    CE term and other teachers); the loss then adds no ``[N, V]`` tensor of its own at ``T = 1``.
    """
    _check_ids(student_logits, t_ids, t_logprobs, "t_logprobs")
    if t_tail.shape != t_ids.shape[:-1]:
        raise ValueError(f"t_tail must be {list(t_ids.shape[:-1])} (ids without k), got {tuple(t_tail.shape)}")
    if kind not in ("forward", "reverse", "jsd"):
        raise ValueError(f"kind must be 'forward', 'reverse' or 'jsd', got {kind!r}")
    if tail not in ("bucket", "renorm"):
        raise ValueError(f"tail must be 'bucket' or 'renorm', got {tail!r}")
    if tail_temperature not in ("bucket", "student_exact"):
        raise ValueError(f"tail_temperature must be 'bucket' or 'student_exact', got {tail_temperature!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1 (use kind='forward'/'reverse' for the limits), got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    t = float(temperature)
    valid = t_ids >= 0
    ids = t_ids.long().clamp_min(0)
    dt = _compute_dtype(student_logits)
    z = student_logits.to(dt)
    t_lp = t_logprobs.to(dt).masked_fill(~valid, NEG_INF)

    if tail == "renorm":
        # Both renormalised over the top-k; per-token temperature is exact here.
        s_top = _gather_ids(_log_softmax(z, t, normalized), ids).masked_fill(~valid, NEG_INF)
        logp, logq = _normalise(_scale(t_lp, t)), _normalise(s_top)
    else:
        exact = tail_temperature == "student_exact"
        s_lsm = _log_softmax(z, t if exact else 1.0, normalized)
        s_top = _gather_ids(s_lsm, ids).masked_fill(~valid, NEG_INF)
        # Student tail = logsumexp over the tokens outside each teacher's top-k, exact, one [N, V]
        # buffer at a time (student_tail.py: not an [R, N, V] masked copy per teacher).
        s_tail = student_tail_logmass(s_lsm, ids, valid)
        s_buckets = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1)
        t_tail_eff = torch.where(torch.isneginf(s_tail), t_tail.to(dt), t_tail.to(dt).clamp_min(TAIL_LOGMASS_FLOOR))
        t_buckets = torch.cat([t_lp, t_tail_eff.unsqueeze(-1)], dim=-1)
        logp = _normalise(_scale(t_buckets, t))
        # At T = 1 the student's buckets already sum to 1: the top-k ids of a row are distinct (engines
        # write a top-k, vocab maps are injective) and the tail holds every other token.
        logq = s_buckets if exact or t == 1.0 else _normalise(s_buckets / t)

    if kind == "forward":
        per_row = _kl(logp, logq)
    elif kind == "reverse":
        per_row = _kl(logq, logp)
    else:
        logm = _safe_logsumexp(torch.stack([logp + math.log(beta), logq + math.log1p(-beta)]), 0)
        per_row = beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    return _reduce(per_row if t == 1.0 else per_row * (t * t), reduction)


def sampled_kd_loss(
    student_logits: Tensor,
    s_ids: Tensor,
    s_counts: Tensor,
    s_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Literal["mean", "none"] = "mean",
    normalized: bool = False,
) -> Tensor:
    """Cross-entropy of the student against a sampled teacher cache (RS-KD / Sparse Logit Sampling).

    At ``T = 1`` the per-row loss ``-sum_i (c_i / D) log q(i)`` (``D`` = draws in the row) is an
    unbiased estimate of ``CE(p, q) = KL(p || q) + H(p)``, because ``E[c_i / D] = p_i``. It is
    forward KL up to the teacher entropy, a constant. At ``T != 1`` the target is ``p_T ∝ p^(1/T)``.
    Each draw is importance-weighted by ``p^(1/T) / p = exp((1/T - 1) log p)``, using the cached
    teacher log-probs ``s_logprobs``, and the weights are self-normalised. The unknown
    normaliser of ``p_T`` cancels that way, but the estimate becomes consistent rather than
    unbiased (O(1/D) bias). The student side is ``log_softmax(z / T)``, and the result is scaled
    by ``T**2``. Padding: id ``-1`` or count 0. A row without draws contributes 0. Like
    ``topk_kd_loss``, takes several teachers stacked in leading dims (``[R, N, k]`` -> ``[R, N]``),
    and student log-probs with ``normalized=True``.
    """
    _check_ids(student_logits, s_ids, s_counts, "s_counts")
    if s_logprobs.shape != s_ids.shape:
        raise ValueError(f"s_logprobs {tuple(s_logprobs.shape)} must match s_ids {tuple(s_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    dt = _compute_dtype(student_logits)
    counts = s_counts.to(dt)  # cached as uint16, which has no comparison kernels
    valid = (s_ids >= 0) & (counts > 0)
    ids = s_ids.long().clamp_min(0)
    counts = counts.masked_fill(~valid, 0.0)
    if t != 1.0:
        logw = ((1.0 / t - 1.0) * s_logprobs.to(dt)).masked_fill(~valid, NEG_INF)
        logw = logw - logw.amax(dim=-1, keepdim=True).nan_to_num(0.0, neginf=0.0)  # scale-free, avoid overflow
        counts = counts * logw.exp()
    weights = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    s_lp = _gather_ids(_log_softmax(student_logits.to(dt), t, normalized), ids)
    per_row = -torch.where(valid, weights * s_lp, torch.zeros_like(s_lp)).sum(-1)
    return _reduce(per_row * (t * t), reduction)


class HiddenProjector(nn.Module):
    """Learned linear maps from student width to teacher width, one per student layer.

    The widths of two families rarely match, and one shared map would tie layers together. Index
    the module with a student layer (``proj[s]``) to get that layer's ``nn.Linear``, or call
    ``proj(h, s)``. Without ``student_layers`` there is a single map, and ``proj(h)`` uses it.
    When the widths are equal, every map starts as the identity, so training starts from plain
    matching.
    """

    def __init__(
        self, student_width: int, teacher_width: int, student_layers: Sequence[int] | None = None, bias: bool = True
    ) -> None:
        super().__init__()
        layers = list(student_layers) if student_layers is not None else [0]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"student_layers must be non-empty and distinct, got {layers}")
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.maps = nn.ModuleDict({str(s): nn.Linear(student_width, teacher_width, bias=bias) for s in layers})
        if student_width == teacher_width:
            with torch.no_grad():
                for lin in self.maps.values():
                    lin.weight.copy_(torch.eye(teacher_width))
                    if lin.bias is not None:
                        lin.bias.zero_()

    def __getitem__(self, student_layer: int) -> nn.Linear:
        key = str(student_layer)
        if key not in self.maps:
            raise KeyError(f"no projector for student layer {student_layer}; have {sorted(self.maps, key=int)}")
        return self.maps[key]  # type: ignore[return-value]

    def forward(self, h: Tensor, student_layer: int | None = None) -> Tensor:
        if student_layer is None:
            if len(self.maps) != 1:
                raise ValueError("several layer projectors: pass student_layer")
            return next(iter(self.maps.values()))(h)
        return self[student_layer](h)


def hidden_state_loss(
    student_h: Tensor,
    teacher_h: Tensor,
    projector: nn.Module | Callable[[Tensor], Tensor] | None,
    kind: Literal["mse", "cosine"] = "mse",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Match projected student hidden states ``[N, Hs]`` to teacher ones ``[N, Ht]`` (teacher detached).

    ``mse`` averages over all elements. ``cosine`` is ``1 - cos`` averaged over rows, so it is
    scale-free: useful when the teacher's hidden-state norms are far larger than the student's.
    ``projector=None`` is allowed only when the widths match. ``reduction="none"`` returns the
    per-row losses ``[N]`` (mse: mean over the row's elements), whose mean is the ``"mean"`` result:
    a batch is projected once and weighted per row, instead of once per sample.
    """
    if student_h.ndim != 2 or teacher_h.ndim != 2 or student_h.shape[0] != teacher_h.shape[0]:
        raise ValueError(f"student_h {tuple(student_h.shape)} / teacher_h {tuple(teacher_h.shape)} must be [N, H]")
    if projector is None:
        if student_h.shape[1] != teacher_h.shape[1]:
            raise ValueError(f"widths differ ({student_h.shape[1]} vs {teacher_h.shape[1]}): pass a projector")
        proj = student_h
    else:
        proj = projector(student_h)
    target = teacher_h.detach().to(proj.dtype)
    if proj.shape != target.shape:
        raise ValueError(f"projected student {tuple(proj.shape)} != teacher {tuple(target.shape)}")
    if kind == "mse" and reduction == "mean":
        return F.mse_loss(proj, target)
    return _reduce(_hidden_rows(proj, target, kind), reduction)


def _hidden_rows(proj: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-row hidden loss over the last dim (any leading dims): mse = mean square, cosine = 1 - cos."""
    if kind == "mse":
        return (proj - target).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(proj, target, dim=-1)
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")


def stacked_hidden_state_rows(
    student_h: Sequence[Tensor],
    teacher_h: Sequence[Tensor],
    projectors: Sequence[nn.Linear],
    kind: Literal["mse", "cosine"] = "mse",
) -> Tensor:
    """``hidden_state_loss(..., reduction="none")`` of ``P`` (student, teacher, projector) pairs at once:
    ``[P, N]``. The pairs share ``N`` and the teacher width; one batched matmul projects them all
    (instead of ``P`` linear layers and ``P`` loss graphs, which dominate on a small student)."""
    if not (len(student_h) == len(teacher_h) == len(projectors)) or not projectors:
        raise ValueError(f"need as many student / teacher states as projectors, got {len(student_h)} / "
                         f"{len(teacher_h)} / {len(projectors)}")
    h, target = torch.stack(list(student_h)), torch.stack([t.detach() for t in teacher_h])
    weight = torch.stack([p.weight for p in projectors]).transpose(1, 2)  # [P, Hs, Ht]
    if any(p.bias is None for p in projectors):
        proj = torch.bmm(h, weight)
    else:
        proj = torch.baddbmm(torch.stack([p.bias for p in projectors]).unsqueeze(1), h, weight)
    if proj.shape != target.shape:
        raise ValueError(f"projected student {tuple(proj.shape)} != teacher {tuple(target.shape)}")
    return _hidden_rows(proj, target.to(proj.dtype), kind)


def layer_map(student_layers: int, teacher_layers: Sequence[int], teacher_depth: int | None = None) -> dict[int, int]:
    """Uniform depth mapping ``{student layer: teacher layer}`` for hidden-state matching.

    Layers use the hidden-state convention (0 = embeddings, ``L`` = last block). Teacher layer
    ``t`` goes to student layer ``round(t * student_layers / teacher_depth)``, with ``teacher_depth``
    defaulting to ``max(teacher_layers)``, so the last goes to the last. Two teacher layers that
    land on the same student layer keep only the closer one (the deeper one on a tie), so every
    student layer gets one target.
    """
    if student_layers < 1 or not teacher_layers:
        raise ValueError(f"need student_layers >= 1 and some teacher layers, got {student_layers}, {teacher_layers}")
    depth = int(teacher_depth if teacher_depth is not None else max(teacher_layers))
    if depth < 1 or min(teacher_layers) < 0 or max(teacher_layers) > depth:
        raise ValueError(f"teacher layers {list(teacher_layers)} must lie in [0, teacher_depth={depth}]")
    best: dict[int, tuple[float, int]] = {}
    for t_layer in sorted(set(teacher_layers)):
        pos = t_layer * student_layers / depth
        s = min(student_layers, math.floor(pos + 0.5))
        dist = abs(pos - s)
        if s not in best or dist <= best[s][0]:
            best[s] = (dist, t_layer)
    return {s: t for s, (_, t) in sorted(best.items())}


def attention_map_loss(student_maps: Tensor, teacher_maps: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked MSE between head-averaged attention maps ``[N, K]`` (Drive-KD).

    ``mask`` (bool or 0/1) broadcasts to ``[N, K]``, e.g. ``[K]`` to keep image keys or ``[N, 1]``
    to keep rows. The loss is the mean over the kept elements of the whole batch, so each token
    counts equally. Drive-KD averages per sample first. Without a mask it is a plain mean. If
    nothing is kept, the result is a zero that still carries a graph to the student.
    """
    if student_maps.shape != teacher_maps.shape or student_maps.ndim != 2:
        raise ValueError(
            f"student {tuple(student_maps.shape)} / teacher {tuple(teacher_maps.shape)} maps must be the same [N, K]"
            " (teacher and student token sequences must match)"
        )
    dt = _compute_dtype(student_maps)
    sq = (student_maps.to(dt) - teacher_maps.detach().to(dt)).pow(2)
    if mask is None:
        return sq.mean() if sq.numel() else sq.sum()
    m = torch.broadcast_to(mask.to(sq.dtype), sq.shape)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def padded_attention_map_loss(student_maps: Tensor, teacher_maps: Tensor, mask: Tensor) -> Tensor:
    """Per-sample masked MSE ``[B]`` of padded attention maps ``[B, T, K]`` (teacher detached).

    Sample ``b``'s loss is the mean over its kept elements (``mask[b]``), i.e. exactly
    ``attention_map_loss`` of its unpadded ``[T_b, K_b]`` maps, but for the whole batch in a few
    tensor ops (one autograd node per op, not per sample). A sample with nothing kept gets 0.
    """
    if student_maps.ndim != 3 or student_maps.shape != teacher_maps.shape or mask.shape != student_maps.shape:
        raise ValueError(f"student {tuple(student_maps.shape)} / teacher {tuple(teacher_maps.shape)} / mask "
                         f"{tuple(mask.shape)} must all be the same [B, T, K]")
    index = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    per_sample = student_maps[0].numel()
    return segment_attention_map_loss(student_maps, teacher_maps.reshape(-1)[index], index,
                                      torch.div(index, max(per_sample, 1), rounding_mode="floor"), len(student_maps))


def segment_attention_map_loss(student_maps: Tensor, teacher_values: Tensor, index: Tensor, segment: Tensor,
                               segments: int) -> Tensor:
    """Per-segment MSE ``[segments]`` of attention-map elements given by position (teacher detached).

    Element ``e`` compares ``student_maps.reshape(-1)[index[e]]`` with ``teacher_values[e]`` and
    belongs to segment ``segment[e]``; a segment's loss is the mean over its elements (0 with none).
    The kept elements of many maps (samples x layers x teachers) go through one gather, one squared
    difference and one segment sum, and the cached maps are never padded to the student's layout.
    """
    if index.shape != teacher_values.shape or segment.shape != index.shape or index.ndim != 1:
        raise ValueError(f"index {tuple(index.shape)} / teacher_values {tuple(teacher_values.shape)} / segment "
                         f"{tuple(segment.shape)} must all be the same [E]")
    dt = _compute_dtype(student_maps)
    sq = (student_maps.reshape(-1)[index].to(dt) - teacher_values.detach().to(dt)).pow(2)
    total = sq.new_zeros(segments).index_add(0, segment, sq)
    return total / torch.bincount(segment, minlength=segments).to(dt).clamp_min(1.0)


def group_teacher_layers(student_layers: Sequence[int], teacher_layers: Sequence[int]) -> dict[int, list[int]]:
    """Drive-KD layer-group matching ``{student layer: teacher layers to average}`` for full maps.

    With ``k`` student and ``m`` teacher layers (each in depth order), the i-th student layer
    takes the window of ``g = max(1, m - k + 1)`` consecutive teacher layers that starts at index
    ``min(i, m - g)``. Every teacher layer is then used, and a deeper teacher is compressed
    without skipping layers.
    """
    s, t = list(student_layers), list(teacher_layers)
    if not s or not t:
        return {}
    g = max(1, len(t) - len(s) + 1)
    return {layer: t[min(i, len(t) - g) : min(i, len(t) - g) + g] for i, layer in enumerate(s)}


def group_mean_maps(teacher_maps: Mapping[int, Tensor], groups: Mapping[int, Sequence[int]]) -> dict[int, Tensor]:
    """Average the teacher maps of each group: ``{student layer: mean of its teacher layers}``."""
    out: dict[int, Tensor] = {}
    for s, layers in groups.items():
        missing = [layer for layer in layers if layer not in teacher_maps]
        if missing or not layers:
            raise KeyError(f"student layer {s}: teacher maps missing for layers {missing or '(empty group)'}")
        out[s] = torch.stack([teacher_maps[layer].float() for layer in layers]).mean(0)
    return out


def default_attention_layers(num_layers: int) -> dict[str, tuple[str, list[int]]]:
    """Drive-KD's default layers per capability for a model with ``num_layers`` blocks.

    Attention layers are 0-based block indices, as in transformers' ``attentions[i]``:
    ``perception`` is the text-to-vision map of the first layer, ``planning`` the text-to-vision
    map of the penultimate layer, and ``reasoning`` the full maps of layers ``0 .. L-2``, which
    ``group_teacher_layers`` pairs between student and teacher.
    """
    if num_layers < 2:
        raise ValueError(f"need at least 2 layers (penultimate layer for planning), got {num_layers}")
    return {
        "perception": ("t2v", [0]),
        "planning": ("t2v", [num_layers - 2]),
        "reasoning": ("full", list(range(num_layers - 1))),
    }


def answer_ce_loss(student_logits: Tensor, target_ids: Tensor, ignore_index: int = -100, *,
                   normalized: bool = False) -> Tensor:
    """Plain next-token cross-entropy on the answer tokens (the hard-label term that anchors AGP).
    ``normalized=True``: ``student_logits`` are log-probs already (shared with the KD terms)."""
    if student_logits.ndim != 2 or target_ids.shape != (student_logits.shape[0],):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} / target_ids {tuple(target_ids.shape)}: need [N, V] / [N]")
    z = student_logits.to(_compute_dtype(student_logits))
    if normalized:
        return F.nll_loss(z, target_ids.long(), ignore_index=ignore_index)
    return F.cross_entropy(z, target_ids.long(), ignore_index=ignore_index)
