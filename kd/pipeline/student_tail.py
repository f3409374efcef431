"""The student's log-mass outside each teacher's top-k: exact, one pass over ``[N, V]`` for any number of teachers.

Top-k KD with a tail bucket needs, per teacher ``r`` and row ``n``, the student's log-probability of
every token *not* among that teacher's top-k ids: ``logsumexp`` of the student's log-softmax with those
ids masked out. Written directly with autograd that is a masked ``[R, N, V]`` copy of the student's
log-probs plus an ``[R, N, V]`` mask, both saved for backward, and the backward of ``logsumexp`` and
``where`` adds a few more of that size: ~15x the bytes of the student's logits for three teachers
(measured: ``bench/kd_loss.py``). The complement ``log(1 - sum_topk q)`` is cheap but loses all
precision when the tail is small, which a confident student's is.

Here every token outside the *union* of the teachers' top-k ids is in every teacher's tail, so
one masked ``logsumexp`` over ``[N, V]`` gives their common part ``base``, and each teacher adds back
the union tokens outside its own top-k (``[R, N, R * k]``, small):
``tail_r = logaddexp(base, logsumexp(s[union \\ top_r]))``. Backward, the gradient of
``sum_r g_r tail_r`` is ``sum_r g_r exp(s_v - tail_r)`` over the teachers whose tail holds ``v``:
for a token outside the union that is ``exp(s_v - m) * sum_r g_r exp(m - tail_r)`` with ``m`` the
smallest finite tail (both factors <= 1 in size, as ``s_v <= tail_r``), one pass; the union tokens
get their exact sums written over it. No subtraction of nearly equal numbers anywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["student_tail_logmass"]

NEG_INF = float("-inf")


def _logsumexp_(x: Tensor) -> Tensor:
    """``logsumexp(x, -1)`` computed in place in ``x`` (no ``[N, V]`` temporary); ``-inf`` for all ``-inf`` rows."""
    m = x.amax(-1, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)
    return x.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


class _TailLogMass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_lsm: Tensor, cols: Tensor) -> Tensor:  # type: ignore[override]
        r, n, k = cols.shape
        v = s_lsm.shape[-1]
        union, _ = cols.permute(1, 0, 2).reshape(n, r * k).sort(dim=1)  # padding (== v) sorts last
        real = union < v
        has_real = real.any(1, keepdim=True)
        # Padding entries point at the row's last real id (writes there are the same), or at token 0
        # in a row without any (then written with its own value): every index is a real column.
        last = (real.sum(1, keepdim=True) - 1).clamp_min(0)
        target = torch.where(real, union, union.gather(1, last)).masked_fill_(~has_real, 0)

        x = s_lsm.clone()
        x.scatter_(1, target, torch.where(has_real, NEG_INF, x.gather(1, target)))
        base = _logsumexp_(x)  # [N]: mass outside every teacher's top-k
        del x

        distinct = real.clone()
        distinct[:, 1:] &= union[:, 1:] != union[:, :-1]
        # [R, N, M]: whether entry m's token is in teacher r's top-k (of ``target``, so that a padding
        # entry gets the same answers, and so the same gradient, as the entry it points at).
        member = _membership(cols, target)
        u_s = s_lsm.gather(1, target)
        add_back = torch.logsumexp(torch.where(distinct & ~member, u_s, NEG_INF), -1)  # [R, N]
        tails = torch.logaddexp(base, add_back)
        ctx.save_for_backward(s_lsm, target, member, tails)
        return tails

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        s_lsm, target, member, tails = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        # A teacher whose top-k covers the row (tail -inf) has no tail to differentiate.
        empty = torch.isneginf(tails)
        tails, grad = tails.masked_fill(empty, 0.0), grad.masked_fill(empty, 0.0)
        m = tails.masked_fill(empty, float("inf")).amin(0)
        m = m.masked_fill(torch.isinf(m), 0.0)  # [N]
        scale = (grad * (m - tails).exp()).sum(0)  # [N]
        out = torch.sub(s_lsm, m[:, None]).exp_().mul_(scale[:, None])
        u_s = s_lsm.gather(1, target)  # [N, M]
        terms = torch.where(member | empty[..., None], NEG_INF, u_s - tails[..., None]).exp()  # [R, N, M]
        union_grad = (grad[..., None] * terms).sum(0)
        # Entries sharing a target have equal values (same token, same membership): the scatter is
        # deterministic. A row without union tokens rewrites its token 0 with the same sum, exactly.
        return out.scatter_(1, target, union_grad), None


def _membership(cols: Tensor, tokens: Tensor) -> Tensor:
    """``[R, N, M]``: whether ``tokens[n, m]`` is among ``cols[r, n, :]`` (sorted search, ``O(M log k)``)."""
    ranked, _ = cols.sort(dim=-1)
    u = tokens.expand(cols.shape[0], *tokens.shape).contiguous()
    pos = torch.searchsorted(ranked, u).clamp_max_(cols.shape[-1] - 1)
    return ranked.gather(-1, pos) == u


def student_tail_logmass(s_lsm: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """``log sum_{v not in ids[r, n]} exp(s_lsm[n, v])`` for student log-probs ``s_lsm`` ``[N, V]`` and
    teacher top-k ids ``ids`` ``[..., N, k]`` (entries where ``valid`` is False are padding and mask
    nothing). Returns ``[..., N]``: ``-inf`` where the ids cover every token. Differentiable in
    ``s_lsm`` (not twice). Memory: one ``[N, V]`` buffer in forward and one in backward, whatever
    the number of teachers; nothing of that size is saved between them."""
    if ids.shape != valid.shape or ids.ndim < 2 or ids.shape[-2] != s_lsm.shape[0]:
        raise ValueError(f"ids {tuple(ids.shape)} / valid {tuple(valid.shape)} must be [..., N={s_lsm.shape[0]}, k]")
    lead = ids.shape[:-2]
    cols = torch.where(valid, ids.long(), s_lsm.shape[-1]).reshape(-1, *ids.shape[-2:])
    return _TailLogMass.apply(s_lsm, cols).reshape(*lead, ids.shape[-2])
