"""Losses against plain dense references and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.pipeline.distill.losses import (
    HiddenProjector,
    answer_ce_loss,
    attention_map_loss,
    default_attention_layers,
    group_mean_maps,
    group_teacher_layers,
    hidden_state_loss,
    layer_map,
    sampled_kd_loss,
    segment_attention_map_loss,
    stacked_hidden_state_rows,
    student_log_probs,
    topk_kd_loss,
)

NEG_INF = float("-inf")
KINDS = ["forward", "reverse", "jsd"]


def _topk_cache(teacher_logits: torch.Tensor, k: int):
    """Top-k cache of a dense teacher, as the engine writes it (sorted, tail = log(1 - sum))."""
    lp = F.log_softmax(teacher_logits, -1)
    top_lp, ids = lp.topk(k, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1.0))
    if k == teacher_logits.shape[-1]:
        tail = torch.full_like(tail, NEG_INF)
    return ids, top_lp, tail


def _dense_ref(logp: torch.Tensor, logq: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between dense log-distributions via torch.nn.functional.kl_div."""
    def kl(a, b):  # KL(a || b)
        return F.kl_div(b, a, log_target=True, reduction="none").sum(-1)

    if kind == "forward":
        return kl(logp, logq)
    if kind == "reverse":
        return kl(logq, logp)
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), 0)
    return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("tail_temperature", ["bucket", "student_exact"])
def test_full_vocab_matches_dense_reference(kind, temperature, tail_temperature):
    g = torch.Generator().manual_seed(0)
    n, v = 6, 11
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    tl = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids, lp, tail = _topk_cache(tl, v)
    perm = torch.randperm(v, generator=g)  # cache order must not matter
    ids, lp = ids[:, perm].to(torch.int32), lp[:, perm]  # int32 as cached
    got = topk_kd_loss(z, ids, lp, tail, kind=kind, temperature=temperature, tail_temperature=tail_temperature,
                       beta=0.3, reduction="none")
    ref = _dense_ref(F.log_softmax(tl / temperature, -1), F.log_softmax(z / temperature, -1), kind, 0.3)
    torch.testing.assert_close(got, ref * temperature**2, atol=1e-5, rtol=0)
    mean = topk_kd_loss(z, ids, lp, tail, kind=kind, temperature=temperature, beta=0.3)
    assert abs(float(mean) - float(ref.mean() * temperature**2)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0])
def test_bucket_mode_equals_dense_kl_of_aggregated_buckets(kind, temperature):
    """k < V: aggregate dense p and q into top-k + rest, temper the buckets, compare."""
    g = torch.Generator().manual_seed(1)
    n, v, k = 5, 9, 3
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    tl = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ids, lp, tail = _topk_cache(tl, k)
    p, q = F.softmax(tl, -1), F.softmax(z, -1)
    pb = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(1, keepdim=True)], 1)
    qb = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(1, keepdim=True)], 1)
    ref = _dense_ref(F.log_softmax(pb.log() / temperature, -1), F.log_softmax(qb.log() / temperature, -1), kind)
    got = topk_kd_loss(z, ids, lp, tail, kind=kind, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, ref * temperature**2, atol=1e-6, rtol=0)


# Hand-built case: V = 4, teacher p = [.5, .3, .15, .05] cached with k = 2 (tail = .2),
# student q = [.4, .4, .1, .1].
P = [0.5, 0.3, 0.15, 0.05]
Q = [0.4, 0.4, 0.1, 0.1]


def _hand_inputs(ids=(0, 1), lps=(math.log(0.5), math.log(0.3))):
    z = torch.tensor([Q], dtype=torch.float64).log()
    return (z, torch.tensor([ids]), torch.tensor([lps], dtype=torch.float64),
            torch.tensor([math.log(0.2)], dtype=torch.float64))


def _kl_hand(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _norm(xs):
    return [x / sum(xs) for x in xs]


def test_tail_bucket_by_hand_t1():
    z, ids, lp, tail = _hand_inputs()
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert abs(float(topk_kd_loss(z, ids, lp, tail)) - want) < 1e-12
    want_rev = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.3)
    assert abs(float(topk_kd_loss(z, ids, lp, tail, kind="reverse")) - want_rev) < 1e-12
    m = [0.45, 0.35, 0.2]
    want_jsd = 0.5 * _kl_hand([0.5, 0.3, 0.2], m) + 0.5 * _kl_hand([0.4, 0.4, 0.2], m)
    assert abs(float(topk_kd_loss(z, ids, lp, tail, kind="jsd")) - want_jsd) < 1e-12


def test_tail_and_temperature_by_hand_t2():
    z, ids, lp, tail = _hand_inputs()
    s = math.sqrt
    # bucket mode: both sides' k + 1 buckets tempered as pseudo-tokens.
    pt, qt = _norm([s(0.5), s(0.3), s(0.2)]), _norm([s(0.4), s(0.4), s(0.2)])
    got = float(topk_kd_loss(z, ids, lp, tail, temperature=2.0))
    assert abs(got - 4 * _kl_hand(pt, qt)) < 1e-12
    # student_exact: student = softmax(log q / 2) over all 4 tokens, tail = its exact tempered mass.
    zq = sum(s(x) for x in Q)
    qe = [s(0.4) / zq, s(0.4) / zq, 2 * s(0.1) / zq]
    got = float(topk_kd_loss(z, ids, lp, tail, temperature=2.0, tail_temperature="student_exact"))
    assert abs(got - 4 * _kl_hand(pt, qe)) < 1e-12


def test_renorm_by_hand():
    z, ids, lp, tail = _hand_inputs()
    assert abs(float(topk_kd_loss(z, ids, lp, tail, tail="renorm")) - _kl_hand([0.625, 0.375], [0.5, 0.5])) < 1e-12
    s = math.sqrt
    want = 9 * _kl_hand(_norm([0.5 ** (1 / 3), 0.3 ** (1 / 3)]), [0.5, 0.5])
    assert abs(float(topk_kd_loss(z, ids, lp, tail, tail="renorm", temperature=3.0)) - want) < 1e-12
    want_rev = 4 * _kl_hand([0.5, 0.5], _norm([s(0.5), s(0.3)]))
    got = float(topk_kd_loss(z, ids, lp, tail, tail="renorm", temperature=2.0, kind="reverse"))
    assert abs(got - want_rev) < 1e-12


def test_padding_and_order_do_not_matter():
    """A -1 pad is clamped to id 0 internally: it must neither mask token 0 nor count twice."""
    z, ids, lp, tail = _hand_inputs()
    base = float(topk_kd_loss(z, ids, lp, tail))
    padded = float(topk_kd_loss(z, torch.tensor([[1, -1, 0]]), torch.tensor([[lp[0, 1], NEG_INF, lp[0, 0]]]), tail))
    assert abs(padded - base) < 1e-12
    # Token 0 outside the top-k, with a pad: tail must include token 0's student mass.
    z2, _, _, _ = _hand_inputs()
    got = float(topk_kd_loss(z2, torch.tensor([[1, -1]]), torch.tensor([[math.log(0.3), NEG_INF]], dtype=torch.float64),
                             torch.tensor([math.log(0.7)], dtype=torch.float64)))
    assert abs(got - _kl_hand([0.3, 0.7], [0.4, 0.6])) < 1e-12


def test_bucket_mode_is_zero_at_the_teacher_for_every_temperature():
    g = torch.Generator().manual_seed(2)
    tl = torch.randn(4, 20, generator=g, dtype=torch.float64) * 2
    ids, lp, tail = _topk_cache(tl, 5)
    z = tl.clone().requires_grad_(True)
    for temp in (0.5, 2.0, 4.0):
        for kind in KINDS:
            loss = topk_kd_loss(z, ids, lp, tail, kind=kind, temperature=temp)
            assert abs(loss.item()) < 1e-10
            (grad,) = torch.autograd.grad(loss, z)
            assert grad.abs().max() < 1e-8
    # The textbook student side does not have this fixed point when k < V.
    assert topk_kd_loss(z, ids, lp, tail, temperature=2.0, tail_temperature="student_exact").item() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [3, 8])
def test_gradients_reach_student_logits(kind, k):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 8, generator=g, requires_grad=True)
    ids, lp, tail = _topk_cache(torch.randn(5, 8, generator=g), k)
    ids[0, -1], lp[0, -1] = -1, NEG_INF  # padding in one row
    for tail_mode in ("bucket", "renorm"):
        loss = topk_kd_loss(z, ids, lp, tail, kind=kind, tail=tail_mode, temperature=2.0)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_rounded_away_tail_keeps_reverse_kl_finite():
    """Engines write tail = -inf under 1e-6 mass; reverse KL must stay finite, forward barely moves."""
    z = torch.zeros(1, 6, requires_grad=True)
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[math.log(0.6), math.log(0.4)]])
    tail = torch.tensor([NEG_INF])
    for kind in KINDS:
        loss = topk_kd_loss(z, ids, lp, tail, kind=kind)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    fwd = topk_kd_loss(z, ids, lp, tail).item()
    assert abs(fwd - (0.6 * math.log(0.6 * 6) + 0.4 * math.log(0.4 * 6))) < 3e-5


def test_bf16_logits_and_bad_inputs():
    z = torch.randn(3, 6).to(torch.bfloat16)
    ids, lp, tail = _topk_cache(torch.randn(3, 6), 2)
    assert topk_kd_loss(z, ids, lp, tail).dtype == torch.float32
    with pytest.raises(ValueError, match="vocabulary"):
        topk_kd_loss(z[:, :2], ids.clamp_min(4), lp, tail)
    with pytest.raises(ValueError, match="beta"):
        topk_kd_loss(z, ids, lp, tail, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="kind"):
        topk_kd_loss(z, ids, lp, tail, kind="tvd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_tail"):
        topk_kd_loss(z, ids, lp, tail[:2])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.data(), st.floats(0.3, 5.0), st.floats(0.05, 0.95))
def test_property_losses_bounded(n, v, data, temp, beta):
    k = data.draw(st.integers(1, v))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids, lp, tail = _topk_cache(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, k)
    for kind in KINDS:
        for tail_mode in ("bucket", "renorm"):
            loss = topk_kd_loss(z, ids, lp, tail, kind=kind, temperature=temp, beta=beta, tail=tail_mode,
                                reduction="none")
            assert torch.isfinite(loss).all() and (loss >= -1e-9).all()
            if kind == "jsd":  # generalised JSD <= binary entropy of beta
                h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
                assert (loss <= h * temp**2 + 1e-9).all()


def _draw_sampled_cache(p: torch.Tensor, m: int, draws: int, g: torch.Generator):
    """m independent sampled caches of one teacher p: distinct ids (-1 padded) + counts + log p."""
    idx = torch.multinomial(p.expand(m, -1), draws, replacement=True, generator=g)
    counts = torch.zeros(m, p.numel(), dtype=torch.int64).scatter_add_(1, idx, torch.ones_like(idx))
    order = counts.argsort(dim=1, descending=True)
    k = int((counts > 0).sum(1).max())
    c = counts.gather(1, order)[:, :k]
    ids = torch.where(c > 0, order[:, :k], torch.full_like(c, -1))
    lps = torch.where(c > 0, p.log()[ids.clamp_min(0)], torch.full((m, k), NEG_INF, dtype=p.dtype))
    return ids.to(torch.int32), c.to(torch.uint16), lps  # the dtypes the cache stores


def test_sampled_estimator_is_unbiased():
    g = torch.Generator().manual_seed(4)
    v, m = 10, 20000
    p = F.softmax(torch.randn(v, generator=g, dtype=torch.float64) * 1.5, -1)
    zq = torch.randn(1, v, generator=g, dtype=torch.float64)
    full_ce = float(-(p * F.log_softmax(zq, -1)[0]).sum())
    ids, counts, lps = _draw_sampled_cache(p, m, 12, g)
    est = sampled_kd_loss(zq.expand(m, -1), ids, counts, lps, reduction="none")
    mean, se = float(est.mean()), float(est.std() / math.sqrt(m))
    assert abs(mean - full_ce) < 4 * se, (mean, full_ce, se)
    assert abs(float(sampled_kd_loss(zq.expand(m, -1), ids, counts, lps)) - mean) < 1e-9


def test_sampled_temperature_is_consistent():
    g = torch.Generator().manual_seed(5)
    v, m, temp = 8, 400, 2.0
    p = F.softmax(torch.randn(v, generator=g, dtype=torch.float64) * 2, -1)
    zq = torch.randn(1, v, generator=g, dtype=torch.float64)
    p_t = F.softmax(p.log() / temp, -1)
    full_ce = float(-(p_t * F.log_softmax(zq / temp, -1)[0]).sum()) * temp**2
    ids, counts, lps = _draw_sampled_cache(p, m, 2000, g)
    got = float(sampled_kd_loss(zq.expand(m, -1), ids, counts, lps, temperature=temp))
    assert abs(got - full_ce) < 0.01 * full_ce


def test_sampled_padding_and_gradient():
    z = torch.tensor([Q], dtype=torch.float64).log().requires_grad_(True)
    ids = torch.tensor([[2, 0, -1]])
    counts = torch.tensor([[1, 3, 0]])
    lps = torch.tensor([[math.log(0.15), math.log(0.5), NEG_INF]], dtype=torch.float64)
    loss = sampled_kd_loss(z, ids, counts, lps)
    assert abs(loss.item() - -(0.25 * math.log(0.1) + 0.75 * math.log(0.4))) < 1e-12
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    empty = sampled_kd_loss(z, torch.full((1, 2), -1), torch.zeros(1, 2), torch.full((1, 2), NEG_INF))
    assert empty.item() == 0.0


def test_hidden_state_loss_and_projector_gradients():
    g = torch.Generator().manual_seed(6)
    proj = HiddenProjector(4, 6, student_layers=[1, 2])
    hs = torch.randn(5, 4, generator=g, requires_grad=True)
    ht = torch.randn(5, 6, generator=g)
    for kind in ("mse", "cosine"):
        loss = hidden_state_loss(hs, ht, proj[2], kind=kind)
        loss.backward()
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    assert proj[2].weight.grad is not None and proj[2].weight.grad.abs().sum() > 0
    assert proj[1].weight.grad is None
    assert torch.equal(proj(hs, 2), proj[2](hs))
    want = F.mse_loss(proj[2](hs), ht)
    torch.testing.assert_close(hidden_state_loss(hs, ht, proj[2]), want)
    with pytest.raises(ValueError, match="widths differ"):
        hidden_state_loss(hs, ht, None)
    with pytest.raises(KeyError):
        proj[3]


def test_projector_starts_as_identity_when_widths_match():
    proj = HiddenProjector(5, 5)
    h = torch.randn(3, 5)
    torch.testing.assert_close(proj(h), h)
    assert hidden_state_loss(h, h.clone(), proj).item() == 0.0
    assert float(hidden_state_loss(h, 2 * h, None, kind="cosine")) < 1e-6


def test_layer_map_is_uniform():
    assert layer_map(8, [4, 8, 12, 16]) == {2: 4, 4: 8, 6: 12, 8: 16}
    assert layer_map(24, [1, 14, 27], teacher_depth=28) == {1: 1, 12: 14, 23: 27}
    assert layer_map(2, [1, 2, 3, 4]) == {1: 2, 2: 4}  # collisions keep the closer teacher layer
    assert layer_map(4, [0, 2]) == {0: 0, 4: 2}
    with pytest.raises(ValueError):
        layer_map(4, [5], teacher_depth=4)


def test_attention_map_masked_mse():
    s = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], requires_grad=True)
    t = torch.tensor([[0.25, 0.75, 0.0], [0.2, 0.1, 0.7]])
    assert abs(attention_map_loss(s, t).item() - (0.0625 * 2 + 0.04 * 2) / 6) < 1e-7
    key_mask = torch.tensor([True, True, False])  # image keys only
    assert abs(attention_map_loss(s, t, key_mask).item() - (0.0625 * 2 + 0.04) / 4) < 1e-7
    row_mask = torch.tensor([[0.0], [1.0]])
    assert abs(attention_map_loss(s, t, row_mask).item() - 0.08 / 3) < 1e-7
    none = attention_map_loss(s, t, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and s.grad is not None
    with pytest.raises(ValueError, match="same"):
        attention_map_loss(s, t[:, :2])


def test_group_teacher_layers_and_defaults():
    assert group_teacher_layers([0, 1, 2], [0, 1, 2, 3, 4]) == {0: [0, 1, 2], 1: [1, 2, 3], 2: [2, 3, 4]}
    assert group_teacher_layers([0, 1, 2, 3], [5, 6]) == {0: [5], 1: [6], 2: [6], 3: [6]}
    maps = {i: torch.full((2, 3), float(i)) for i in range(5)}
    means = group_mean_maps(maps, group_teacher_layers([0, 1, 2], list(range(5))))
    assert [float(means[i][0, 0]) for i in range(3)] == [1.0, 2.0, 3.0]
    with pytest.raises(KeyError):
        group_mean_maps(maps, {0: [7]})
    d = default_attention_layers(28)
    assert d["perception"] == ("t2v", [0]) and d["planning"] == ("t2v", [26])
    assert d["reasoning"] == ("full", list(range(27)))


def test_answer_ce_loss():
    z = torch.randn(4, 7)
    y = torch.tensor([1, 0, -100, 6])
    torch.testing.assert_close(answer_ce_loss(z, y), F.cross_entropy(z, y))


# ----------------------------------------------------------------------------- several teachers at once
# (the objective computes each kind of term for all teachers together; it must equal one at a time)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail_mode, tail_temperature", [("bucket", "bucket"), ("bucket", "student_exact"),
                                                         ("renorm", "bucket")])
def test_stacked_teachers_equal_one_teacher_at_a_time(kind, tail_mode, tail_temperature):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    caches = [_topk_cache(torch.randn(5, 12, generator=g, dtype=torch.float64) * 2, 4) for _ in range(3)]
    caches[1][0][2, -1], caches[1][1][2, -1] = -1, NEG_INF  # padding in one teacher only
    ids, lp, tail = (torch.stack(x) for x in zip(*caches))
    for temp in (1.0, 2.0):
        opts = {"kind": kind, "tail": tail_mode, "tail_temperature": tail_temperature, "temperature": temp,
                "reduction": "none"}
        stacked = topk_kd_loss(z, ids, lp, tail, **opts)
        one = torch.stack([topk_kd_loss(z, *c, **opts) for c in caches])
        assert stacked.shape == (3, 5)
        torch.testing.assert_close(stacked, one, rtol=1e-12, atol=1e-12)
        (g_stacked,) = torch.autograd.grad(stacked.sum(), z)
        (g_one,) = torch.autograd.grad(one.sum(), z)
        torch.testing.assert_close(g_stacked, g_one, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="t_tail"):
        topk_kd_loss(z, ids, lp, tail[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail_mode, tail_temperature", [("bucket", "bucket"), ("bucket", "student_exact"),
                                                         ("renorm", "bucket")])
def test_shared_log_probs_equal_logits(kind, tail_mode, tail_temperature):
    """``normalized=True`` on ``student_log_probs(z)`` (one log-softmax shared by CE and every KD
    term) gives the losses and gradients of the raw logits, at every temperature."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ids, lp, tail = (torch.stack(x) for x in zip(*[_topk_cache(torch.randn(5, 12, generator=g, dtype=torch.float64), 4)
                                                   for _ in range(2)]))
    counts = torch.randint(0, 3, ids.shape, generator=g).double()
    targets = torch.randint(0, 12, (5,), generator=g)
    for temp in (1.0, 0.7):
        opts = {"kind": kind, "tail": tail_mode, "tail_temperature": tail_temperature, "temperature": temp}
        pairs = [(topk_kd_loss(z, ids, lp, tail, **opts),
                  topk_kd_loss(student_log_probs(z), ids, lp, tail, normalized=True, **opts)),
                 (sampled_kd_loss(z, ids, counts, lp, temperature=temp),
                  sampled_kd_loss(student_log_probs(z), ids, counts, lp, temperature=temp, normalized=True)),
                 (answer_ce_loss(z, targets), answer_ce_loss(student_log_probs(z), targets, normalized=True))]
        for raw, shared in pairs:
            torch.testing.assert_close(shared, raw, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(torch.autograd.grad(shared, z)[0], torch.autograd.grad(raw, z)[0],
                                       rtol=1e-10, atol=1e-12)


def test_stacked_sampled_teachers_equal_one_teacher_at_a_time():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 4, 5), generator=g)
    ids[0, 1, -1] = -1
    counts = torch.randint(0, 4, (2, 4, 5), generator=g).to(torch.float64)
    lp = -torch.rand(2, 4, 5, generator=g, dtype=torch.float64) * 3
    for temp in (1.0, 0.5):
        stacked = sampled_kd_loss(z, ids, counts, lp, temperature=temp, reduction="none")
        one = torch.stack([sampled_kd_loss(z, ids[r], counts[r], lp[r], temperature=temp, reduction="none")
                           for r in range(2)])
        torch.testing.assert_close(stacked, one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_stacked_hidden_rows_equal_one_pair_at_a_time(kind):
    g = torch.Generator().manual_seed(9)
    hs = [torch.randn(6, 4, generator=g, requires_grad=True) for _ in range(2)]
    ht = [torch.randn(6, 5, generator=g) for _ in range(3)]
    proj = HiddenProjector(4, 5, student_layers=[1, 2])
    pairs = [(hs[0], ht[0], proj[1]), (hs[1], ht[1], proj[2]), (hs[0], ht[2], proj[2])]
    stacked = stacked_hidden_state_rows(*zip(*pairs), kind=kind)
    one = torch.stack([hidden_state_loss(h, t, p, kind, reduction="none") for h, t, p in pairs])
    torch.testing.assert_close(stacked, one)
    grads = torch.autograd.grad(stacked.sum(), [*hs, proj[2].weight])
    want = torch.autograd.grad(one.sum(), [*hs, proj[2].weight])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_segment_attention_loss_equals_per_map_loss():
    g = torch.Generator().manual_seed(10)
    student = torch.rand(2, 3, 4, generator=g, requires_grad=True)
    # Segment 0: rows 0..1 x keys {1, 3} of map 0; segment 1: row 0 x keys 0..3 of map 1; segment 2: empty.
    picks = [(0, [0, 1], [1, 3]), (1, [0], [0, 1, 2, 3])]
    index, segment, teacher, want = [], [], [], []
    for seg, (b, rows, keys) in enumerate(picks):
        t = torch.rand(len(rows), len(keys), generator=g)
        index += [b * 12 + r * 4 + k for r in rows for k in keys]
        segment += [seg] * t.numel()
        teacher.append(t.reshape(-1))
        want.append(attention_map_loss(student[b][rows][:, keys], t))
    got = segment_attention_map_loss(student, torch.cat(teacher), torch.tensor(index), torch.tensor(segment), 3)
    torch.testing.assert_close(got, torch.stack(want + [torch.tensor(0.0)]))
    got.sum().backward()
    assert student.grad is not None and student.grad[0, 2].abs().sum() == 0  # row 2 of map 0 is not read
