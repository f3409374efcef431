"""The student's tail log-mass (``student_tail``) against the plain masked-logsumexp reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.pipeline.distill.student_tail import student_tail_logmass

NEG_INF = float("-inf")


def _reference(s_lsm: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The direct formula: an [R, N, V] mask per teacher (what the function avoids)."""
    mask = torch.zeros(ids.shape[:-1] + s_lsm.shape[-1:], dtype=torch.bool)
    for idx in zip(*torch.nonzero(valid, as_tuple=True)):
        mask[idx[:-1] + (ids[idx],)] = True
    return torch.logsumexp(torch.where(mask, NEG_INF, s_lsm), -1)


def _reference_grad(s_lsm: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d(sum g * tail)/d s: g[r, n] * exp(s - tail) on each teacher's unmasked tokens, by hand."""
    tails = _reference(s_lsm, ids, valid)
    out = torch.zeros_like(s_lsm)
    for r in range(ids.shape[0]):
        for n in range(ids.shape[1]):
            if torch.isneginf(tails[r, n]):
                continue
            keep = torch.ones(s_lsm.shape[1], dtype=torch.bool)
            keep[ids[r, n][valid[r, n]]] = False
            out[n, keep] += g[r, n] * (s_lsm[n, keep] - tails[r, n]).exp()
    return out


def _case(seed: int, r: int, n: int, v: int, k: int, p_pad: float, shared: float, scale: float = 3.0,
          dtype=torch.float64):
    """Student log-probs and ``r`` teachers' top-k ids; ``shared``: chance an id is teacher 0's."""
    g = torch.Generator().manual_seed(seed)
    s_lsm = torch.log_softmax(scale * torch.randn(n, v, generator=g, dtype=dtype), -1)
    ids = torch.stack([torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]) for _ in range(r)])
    share = torch.rand(ids.shape, generator=g) < shared
    ids = torch.where(share, ids[:1].expand_as(ids), ids)
    # Keep ids distinct within a row (a top-k is): fall back to the teacher's own draw where sharing repeated one.
    for i, j in zip(*torch.nonzero(torch.ones(r, n), as_tuple=True)):
        row = ids[i, j]
        if len(set(row.tolist())) < k:
            ids[i, j] = torch.randperm(v, generator=g)[:k]
    valid = torch.rand(ids.shape, generator=g) >= p_pad
    return s_lsm, torch.where(valid, ids, -1), valid


@pytest.mark.parametrize("r,n,v,k,p_pad,shared", [
    (3, 9, 17, 5, 0.2, 0.5),   # overlapping teachers, some padding
    (1, 6, 8, 8, 0.0, 0.0),    # the top-k covers the vocabulary: tail -inf
    (2, 5, 7, 7, 0.3, 0.9),    # some rows covered, some not
    (3, 4, 12, 4, 1.0, 0.0),   # every entry padding: the tail is the whole row (log 1)
    (4, 8, 30, 6, 0.0, 1.0),   # identical teachers
    (17, 3, 40, 3, 0.1, 0.5),  # more teachers than a 16-bit set holds
])
def test_values_and_gradients_equal_the_masked_reference(r, n, v, k, p_pad, shared):
    s_lsm, ids, valid = _case(0, r, n, v, k, p_pad, shared)
    s = s_lsm.clone().requires_grad_()
    tails = student_tail_logmass(s, ids, valid)
    ref = _reference(s_lsm, ids, valid)
    assert torch.equal(torch.isneginf(tails), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(tails[finite], ref[finite], rtol=1e-12, atol=1e-12)
    g = torch.randn(tails.shape, dtype=s.dtype, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((tails.masked_fill(~finite, 0.0) * g).sum(), s)
    torch.testing.assert_close(grad, _reference_grad(s_lsm, ids, valid, g), rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    s_lsm, ids, valid = _case(2, 3, 5, 9, 3, 0.2, 0.6)
    assert torch.autograd.gradcheck(lambda s: student_tail_logmass(s, ids, valid), (s_lsm.requires_grad_(),))


@pytest.mark.parametrize("height", [30.0, 100.0])
def test_small_tails_keep_relative_precision_in_float32(height):
    """A confident student's tail (~1e-12, ~1e-42 here) is exact to float32 rounding, where
    ``log(1 - sum top-k)`` would read 0 or garbage; its gradient neither underflows nor overflows
    (``exp(s - tail)`` with ``exp(s)`` below float32's range)."""
    n, v, k = 4, 50, 5
    logits = torch.zeros(n, v)
    logits[:, :k] = height  # top-k mass 1 - ~45 exp(-height)
    s32 = torch.log_softmax(logits, -1).requires_grad_()
    ids = torch.arange(k).expand(2, n, k).contiguous()
    ids[1, :, -1] = k  # the second teacher's last id is a tail token of the first
    valid = torch.ones_like(ids, dtype=torch.bool)
    tails = student_tail_logmass(s32, ids, valid)
    ref = _reference(s32.detach().double(), ids, valid)
    torch.testing.assert_close(tails.double(), ref, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(tails.sum(), s32)
    ref_grad = _reference_grad(s32.detach().double(), ids, valid, torch.ones(2, n, dtype=torch.float64))
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_leading_dims_and_bad_shapes():
    s_lsm, ids, valid = _case(3, 6, 4, 10, 3, 0.1, 0.3)
    flat = student_tail_logmass(s_lsm, ids, valid)
    stacked = student_tail_logmass(s_lsm, ids.view(2, 3, 4, 3), valid.view(2, 3, 4, 3))
    assert torch.equal(stacked.view(6, 4), flat)
    # Alone, a teacher's union is its own top-k: the same value up to rounding.
    torch.testing.assert_close(student_tail_logmass(s_lsm, ids[0], valid[0]), flat[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="must be"):
        student_tail_logmass(s_lsm, ids[:, :3], valid[:, :3])


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 4), n=st.integers(1, 6), v=st.integers(2, 24), data=st.data(),
       p_pad=st.sampled_from([0.0, 0.3, 1.0]), shared=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_property_matches_reference(r, n, v, data, p_pad, shared, seed):
    k = data.draw(st.integers(1, v))
    s_lsm, ids, valid = _case(seed, r, n, v, k, p_pad, shared, scale=data.draw(st.sampled_from([0.1, 3.0, 30.0])))
    s = s_lsm.clone().requires_grad_()
    tails = student_tail_logmass(s, ids, valid)
    ref = _reference(s_lsm, ids, valid)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(tails))
    torch.testing.assert_close(tails[finite], ref[finite], rtol=1e-10, atol=1e-10)
    g = torch.rand(tails.shape, dtype=s.dtype, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((tails.masked_fill(~finite, 0.0) * g).sum(), s)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, _reference_grad(s_lsm, ids, valid, g), rtol=1e-8, atol=1e-10)
