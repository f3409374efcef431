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
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.pipeline.distill.student_tail import student_tail_logmass

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


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bf16 inputs (log-space sums need it), float64 kept as is."""
    return torch.promote_types(x.dtype, torch.float32)


def _log_softmax(z: Tensor, t: float, normalized: bool) -> Tensor:
    """``log_softmax(z / t)``; no op when ``z`` already holds log-probs and ``t = 1``."""
    return z if normalized and t == 1.0 else F.log_softmax(_scale(z, t), dim=-1)


def student_log_probs(student_logits: Tensor) -> Tensor:
    """``log_softmax`` of student logits in float32 (or wider), to compute once and pass with
    ``normalized=True`` to the CE and every KD loss: one ``[N, V]`` tensor saved for backward, not one each."""
    return F.log_softmax(student_logits.to(compute_dtype(student_logits)), dim=-1)


def reduce_rows(per_row: Tensor, reduction: str) -> Tensor:
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
    dt = compute_dtype(student_logits)
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
    return reduce_rows(per_row if t == 1.0 else per_row * (t * t), reduction)


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
    dt = compute_dtype(student_logits)
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
    return reduce_rows(per_row * (t * t), reduction)


def answer_ce_loss(student_logits: Tensor, target_ids: Tensor, ignore_index: int = -100, *,
                   normalized: bool = False) -> Tensor:
    """Plain next-token cross-entropy on the answer tokens (the hard-label term that anchors AGP).
    ``normalized=True``: ``student_logits`` are log-probs already (shared with the KD terms)."""
    if student_logits.ndim != 2 or target_ids.shape != (student_logits.shape[0],):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} / target_ids {tuple(target_ids.shape)}: need [N, V] / [N]")
    z = student_logits.to(compute_dtype(student_logits))
    if normalized:
        return F.nll_loss(z, target_ids.long(), ignore_index=ignore_index)
    return F.cross_entropy(z, target_ids.long(), ignore_index=ignore_index)
