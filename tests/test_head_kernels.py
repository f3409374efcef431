"""head_kernels.TiledHead against a plain log-softmax / top-k, and its determinism.

The reference is ``torch.log_softmax`` of the float64 logits over the whole row, then
``torch.topk``: the kernel (tiles, sub-block maxima, logsumexp combined from tile sums) must give
the same top-k values to 1e-5 and the same ids except where logits tie, at a real vocabulary
(151,936), with exact ties, ``-inf`` logits, and vocabularies / row counts that do not fill the
last tile, sub-block or row block. Determinism: a row's bits must not change with the rows scored
beside it or with the thread count (a plain matmul's do: the second test checks that it would).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_models import assert_same_topk

from kd.pipeline.build.engines.head_kernels import TiledHead, sub_block_size

TOL = 1e-5
VOCAB = 151_936


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    return torch.log_softmax(logits, dim=-1)


def assert_topk_matches(vals: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor, k: int, tol: float = TOL) -> None:
    ref_vals, ref_ids = torch.topk(ref, k, dim=-1)
    assert vals.shape == ids.shape == (ref.shape[0], k) and vals.dtype == torch.float32 and ids.dtype == torch.int64
    np.testing.assert_allclose(vals.numpy(), ref_vals.numpy(), atol=tol)
    assert (vals[:, :-1] >= vals[:, 1:]).all(), "not sorted by descending log-prob"
    assert all(len(set(row)) == k for row in ids.tolist()), "an id reported twice"
    # each id carries its own log-prob (not just the same sorted values), and the sets agree but for ties
    np.testing.assert_allclose(vals.numpy(), ref.gather(1, ids).numpy(), atol=tol)
    assert_same_topk(ids.numpy(), vals.numpy(), ref_ids.numpy(), ref_vals.numpy(), tol)


@pytest.fixture(scope="module")
def big_head():
    g = torch.Generator().manual_seed(0)
    return torch.randn(VOCAB, 64, generator=g) * 0.3, torch.randn(45, 64, generator=g)


@pytest.mark.parametrize("k", [1, 20, 64])
def test_topk_matches_plain_log_softmax_at_vocab_151936(big_head, k):
    weight, x = big_head
    head = TiledHead(weight, rows=16)  # 45 rows: two full blocks and a padded one
    vals, ids = head.topk(x, k)
    ref = reference(x, weight)
    assert_topk_matches(vals, ids, ref, k)
    # and the plain float32 path the kernel replaces
    plain_vals, _ = torch.topk(torch.log_softmax(x @ weight.T, -1), k, -1)
    np.testing.assert_allclose(vals.numpy(), plain_vals.numpy(), atol=TOL)
    np.testing.assert_allclose(head.logprobs(x[:7]).numpy(), ref[:7].numpy(), atol=TOL)


def test_exact_ties_give_the_plain_top_k_values():
    # Integer logits from a 3-valued weight and one-hot rows: thousands of exact ties, at the k-th value too.
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(-1, 2, (VOCAB // 8, 4), generator=g).float()
    x = torch.eye(4).repeat(3, 1)
    for rows in (5, 128):
        vals, ids = TiledHead(weight, rows=rows).topk(x, 64)
        assert_topk_matches(vals, ids, reference(x, weight), 64)  # logit levels are 1 apart: same values


def test_minus_inf_logits_whole_tiles_and_nearly_whole_rows():
    g = torch.Generator().manual_seed(2)
    vocab, k = 10_000, 16
    weight = torch.randn(vocab, 32, generator=g)
    x = torch.randn(6, 32, generator=g)
    bias = torch.zeros(vocab)
    bias[:4096] = -torch.inf  # the first two 2048-id tiles hold nothing but -inf
    bias[5000:5200:3] = -torch.inf
    head = TiledHead(weight, bias, rows=4, vocab_tile=2048)
    vals, ids = head.topk(x, k)
    assert torch.isfinite(vals).all() and (ids >= 4096).all()
    assert_topk_matches(vals, ids, reference(x, weight, bias), k)
    dense = head.logprobs(x)
    np.testing.assert_allclose(dense.numpy(), reference(x, weight, bias).numpy(), atol=TOL)
    # fewer finite logits than k: the rest are -inf, as in a plain log-softmax
    bias[:] = -torch.inf
    bias[[17, 4099, 9999]] = 0.0
    vals, ids = TiledHead(weight, bias, rows=4).topk(x, 8)
    ref = reference(x, weight, bias)
    np.testing.assert_allclose(vals[:, :3].numpy(), torch.topk(ref, 3, -1).values.numpy(), atol=TOL)
    assert (vals[:, 3:] == -torch.inf).all() and all(set(row[:3]) == {17, 4099, 9999} for row in ids.tolist())


@pytest.mark.parametrize("vocab,k,tile", [(VOCAB, 64, 2048), (4099, 64, 1000), (1000, 64, 2048), (64, 64, 2048),
                                          (300, 7, 64)])
def test_boundaries_of_tiles_sub_blocks_and_row_blocks(vocab, k, tile):
    """The row max planted on the first / last id of the vocabulary and of tiles; vocabularies that do not
    fill the last sub-block (the padding ids must never come back) or tile; 1, R-1, R and R+1 rows."""
    g = torch.Generator().manual_seed(vocab)
    weight = torch.randn(vocab, 16, generator=g)
    x = torch.randn(9, 16, generator=g)
    bias = torch.zeros(vocab)
    sub = sub_block_size(vocab, k)
    step = max(sub, tile // sub * sub)
    for i, v in enumerate([0, vocab - 1, min(step, vocab - 1), min(step - 1, vocab - 1), vocab // 2]):
        bias[v] = 30.0 + i
    ref = reference(x, weight, bias)
    for n in (1, 3, 4, 5, 9):
        vals, ids = TiledHead(weight, bias, rows=4, vocab_tile=tile).topk(x[:n], k)
        assert (ids < vocab).all()
        # planted logits of 30+ put log-probs near -30, where a float32 ulp is 2e-6: 2x the usual tolerance
        assert_topk_matches(vals, ids, ref[:n], k, tol=2 * TOL)


def test_k_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="1 <= k <= vocabulary"):
        TiledHead(torch.zeros(10, 4)).topk(torch.zeros(1, 4), 11)
    with pytest.raises(ValueError, match="float32"):
        TiledHead(torch.zeros(10, 4, dtype=torch.float64))


def _bits(head: TiledHead, x: torch.Tensor, k: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    vals, ids = head.topk(x, k)
    return vals.view(torch.int32), ids


def test_a_rows_bits_do_not_depend_on_its_block_mates_or_the_thread_count():
    """At a width (1,024) where a plain matmul's result changes with the thread count (MKL splits
    the reduction), for a row scored alone (where BLAS takes a matrix-vector path), in another
    order or among other rows."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4096, 1024, generator=g) * 0.05
    x = torch.randn(40, 1024, generator=g)
    head = TiledHead(weight, rows=128, vocab_tile=2048)  # the CPU defaults
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref_vals, ref_ids = _bits(head, x)
        ref_dense = head.logprobs(x[:5])
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            perm = torch.randperm(40, generator=g)
            for rows, idx in ((x, slice(None)), (x[perm], perm), (x[7:8], slice(7, 8)), (x[3:21], slice(3, 21))):
                vals, ids = _bits(head, rows)
                assert torch.equal(vals, ref_vals[idx]) and torch.equal(ids, ref_ids[idx]), (n, idx)
            assert torch.equal(head.logprobs(x[:5]), ref_dense)
    finally:
        torch.set_num_threads(threads)
