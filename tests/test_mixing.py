"""Multi-teacher mixing: capability matrix, learnable loss weights, AGP."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.pipeline.distill.mixing import (
    LearnableLossWeights,
    agp_combine,
    agp_project,
    assign_grads,
    grad_norms,
    mixing_matrix,
    per_loss_grads,
    teacher_weights,
)

ROLES = ["perception", "reasoning", "planning"]


def _dot(a, b) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def test_mixing_matrix_default():
    m = mixing_matrix(ROLES)
    want = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(m, want)
    torch.testing.assert_close(mixing_matrix(["a", "b"], diag=0.7), torch.tensor([[0.7, 0.3], [0.3, 0.7]]))
    assert mixing_matrix(["only"]).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="distinct"):
        mixing_matrix(["a", "a"])
    with pytest.raises(ValueError, match="diag"):
        mixing_matrix(ROLES, diag=1.5)


def test_teacher_weights_per_capability_applied():
    m = mixing_matrix(ROLES)
    caps = ["planning", "perception", "planning", "reasoning"]
    w = teacher_weights(caps, ROLES, m)
    assert w.shape == (4, 3)
    torch.testing.assert_close(w[0], torch.tensor([0.1, 0.1, 0.8]))
    torch.testing.assert_close(w[1], torch.tensor([0.8, 0.1, 0.1]))
    torch.testing.assert_close(w[3], torch.tensor([0.1, 0.8, 0.1]))
    # Applied to per-sample, per-teacher distillation losses:
    per_teacher = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 10.0], [4.0, 0.0, 0.0]])
    mixed = (w * per_teacher).sum(1)
    torch.testing.assert_close(mixed, torch.tensor([0.1 + 0.2 + 2.4, 0.8 + 0.2 + 0.3, 8.0, 0.4]))


def test_teacher_weights_custom_and_unknown():
    custom = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(teacher_weights(["reasoning"], ROLES, custom), torch.tensor([[0.0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="unknown capabilities \\['Planning'\\]"):
        teacher_weights(["Planning"], ROLES, custom)
    uni = teacher_weights(["Planning", "perception"], ROLES, custom, unknown="uniform")
    torch.testing.assert_close(uni, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "matrix, match",
    [
        (torch.full((2, 3), 1 / 3), "shape"),
        (torch.eye(3) * 0.9, "sum to 1"),
        (torch.tensor([[1.5, -0.5, 0.0], [0, 1, 0], [0, 0, 1.0]]), "non-negative"),
        (torch.tensor([[float("nan"), 1.0, 0.0], [0, 1, 0], [0, 0, 1.0]]), "finite"),
    ],
)
def test_teacher_weights_rejects_bad_matrices(matrix, match):
    with pytest.raises(ValueError, match=match):
        teacher_weights(["perception"], ROLES, matrix)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=3, max_size=3), st.floats(0.0, 0.95))
def test_loss_weights_sum_to_one_with_ce_floor(theta, floor):
    lw = LearnableLossWeights(["ce", "p", "r"], ce_floor=floor)
    with torch.no_grad():
        lw.theta.copy_(torch.tensor(theta))
    w = lw().detach()
    assert abs(float(w.sum()) - 1.0) < 1e-5
    assert float(w[0]) >= floor - 1e-6 and (w >= 0).all()


def test_loss_weights_init_and_combine_is_detached():
    lw = LearnableLossWeights(["p", "ce", "d"], init={"ce": 0.7, "p": 0.2, "d": 0.1})
    assert lw.as_dict() == pytest.approx({"p": 0.2, "ce": 0.7, "d": 0.1}, abs=1e-6)
    x = torch.tensor(2.0, requires_grad=True)
    total = lw.combine({"p": x, "ce": x * 3, "d": x * x})
    total.backward()
    assert lw.theta.grad is None
    assert x.grad is not None and abs(float(x.grad) - (0.2 + 2.1 + 0.4)) < 1e-5
    with pytest.raises(ValueError, match="CE >"):
        LearnableLossWeights(["ce", "p"], init={"ce": 0.5, "p": 0.5})
    with pytest.raises(ValueError, match="ce_key"):
        LearnableLossWeights(["p", "r"])


def _fit_gradnorm(lw: LearnableLossWeights, losses, norms, steps: int = 400) -> tuple[float, float]:
    opt = torch.optim.Adam(lw.parameters(), lr=0.05)
    first = lw.gradnorm_objective(losses, norms).item()
    for _ in range(steps):
        opt.zero_grad()
        lw.gradnorm_objective(losses, norms).backward()
        opt.step()
    return first, lw.gradnorm_objective(losses, norms).item()


def test_gradnorm_balances_weighted_gradient_norms():
    losses = {"ce": torch.tensor(2.0), "p": torch.tensor(1.0), "r": torch.tensor(1.0)}
    norms = {"ce": torch.tensor(1.0), "p": torch.tensor(1.0), "r": torch.tensor(8.0)}
    # Without a floor the optimum equalises w_i G_i: w = (8, 8, 1) / 17.
    free = LearnableLossWeights(["ce", "p", "r"], ce_floor=0.0)
    first, last = _fit_gradnorm(free, losses, norms)
    assert last < 0.05 * first
    assert free.as_dict() == pytest.approx({"ce": 8 / 17, "p": 8 / 17, "r": 1 / 17}, abs=0.02)
    assert torch.equal(free.initial_losses, torch.tensor([2.0, 1.0, 1.0]))
    # With the Drive-KD floor, CE keeps >= 0.6 and the larger-gradient loss still gets less weight.
    floored = LearnableLossWeights(["ce", "p", "r"], ce_floor=0.6)
    first, last = _fit_gradnorm(floored, losses, norms)
    w = floored.as_dict()
    assert last < first and w["ce"] >= 0.6 - 1e-6 and w["r"] < w["p"]
    lw2 = LearnableLossWeights(["ce", "p"], alpha=1.5)
    assert torch.isfinite(lw2.gradnorm_objective({"ce": 1.0, "p": 2.0}, {"ce": 1.0, "p": 2.0}))


def _tiny_problem():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.ones(4))
    x = torch.randn(5, 3)
    out = lin(x)
    losses = {"ce": out.pow(2).mean(), "p": out.sum(), "r": torch.tensor(0.5)}  # r: a skipped term
    return lin, unused, x, losses


def test_per_loss_grads_match_separate_autograd():
    lin, unused, x, losses = _tiny_problem()
    params = [lin.weight, lin.bias, unused]
    grads = per_loss_grads(losses, params)
    ref = torch.autograd.grad(lin(x).pow(2).mean(), [lin.weight, lin.bias])
    torch.testing.assert_close(grads["ce"][0], ref[0])
    torch.testing.assert_close(grads["ce"][1], ref[1])
    assert torch.equal(grads["ce"][2], torch.zeros(4)) and all(not g.any() for g in grads["r"])
    norms = grad_norms(grads)
    assert abs(float(norms["ce"]) - float(torch.cat([ref[0].flatten(), ref[1]]).norm())) < 1e-6


def test_agp_crafted_conflict():
    ce = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    conflicting = [torch.tensor([-1.0, 1.0]), torch.tensor([2.0])]  # dot with CE = -1
    friendly = [torch.tensor([0.5, -1.0]), torch.tensor([-3.0])]  # dot with CE = 0.5
    # Stage 1 alone (one capability): only the CE component is removed, and only from the conflicting one.
    alone = agp_project({"ce": ce, "p": conflicting})
    assert all(torch.equal(a, b) for a, b in zip(alone["ce"], ce))  # CE untouched
    torch.testing.assert_close(alone["p"][0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(alone["p"][1], torch.tensor([2.0]))
    assert _dot(alone["p"], ce) >= 0
    assert all(torch.equal(a, b) for a, b in zip(agp_project({"ce": ce, "d": friendly})["d"], friendly))
    out = agp_project({"ce": ce, "p": conflicting, "d": friendly})
    assert all(torch.equal(a, b) for a, b in zip(out["ce"], ce))
    assert _dot(out["p"], ce) >= -1e-7 and _dot(out["d"], ce) >= -1e-7
    # Stage 1 outputs p=[0,1 | 2] and d=[.5,-1 | -3] conflict (dot -7): PCGrad projects them off each other.
    pd = -7.0
    p1, d1 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.5, -1.0, -3.0])
    want_p = p1 - pd / d1.dot(d1) * d1
    want_d = d1 - pd / p1.dot(p1) * p1
    torch.testing.assert_close(torch.cat(out["p"]), want_p)
    torch.testing.assert_close(torch.cat(out["d"]), want_d)
    total = agp_combine({"ce": ce, "p": conflicting, "d": friendly})
    torch.testing.assert_close(torch.cat(total), torch.cat(ce) + want_p + want_d)


def test_agp_leaves_non_conflicting_gradients_unchanged():
    ce = [torch.tensor([1.0, 1.0, 0.0])]
    a, b = [torch.tensor([1.0, 0.0, 1.0])], [torch.tensor([0.0, 2.0, 0.5])]
    out = agp_project({"ce": ce, "a": a, "b": b})
    assert torch.equal(out["a"][0], a[0]) and torch.equal(out["b"][0], b[0])
    assert torch.equal(agp_combine({"ce": ce, "a": a, "b": b})[0], ce[0] + a[0] + b[0])
    with pytest.raises(KeyError, match="anchor"):
        agp_project({"a": a})


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**16))
def test_agp_properties(n_caps, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 2)]
    grads = {"ce": [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]}
    for i in range(n_caps):
        grads[f"c{i}"] = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    out = agp_project(grads, generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(out["ce"], grads["ce"]))
    for k, v in out.items():
        assert _dot(v, grads["ce"]) >= -1e-9, k  # stage 2 never re-creates a conflict with CE
        if _dot(grads[k], grads["ce"]) >= 0 and n_caps == 1:
            assert all(torch.equal(a, b) for a, b in zip(v, grads[k]))


def test_agp_end_to_end_step():
    lin, _, x, losses = _tiny_problem()
    params = list(lin.parameters())
    grads = per_loss_grads({k: v for k, v in losses.items()}, params)
    total = agp_combine(grads)
    before = lin.weight.detach().clone()
    assign_grads(params, total)
    assign_grads(params, total)  # accumulation adds
    torch.testing.assert_close(lin.weight.grad, 2 * total[0])
    torch.optim.SGD(params, lr=0.1).step()
    assert not torch.equal(lin.weight, before)
