"""Synthetic teacher-like top-k outputs for benchmarks and tests (no model needed).

Real teacher top-k sets mix a few frequent tokens (punctuation, common words) with
context-specific ones, and their log-probs fall off steeply after a confident top-1. The
generator mimics both so codec sizes and KL errors measured on it are meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticTopK:
    ids: np.ndarray  # [N, k] int32, sorted by descending log-prob
    logprobs: np.ndarray  # [N, k] float32
    tail_logmass: np.ndarray  # [N] float32
    target_ids: np.ndarray  # [N] int32


def teacher_like_topk(n_tokens: int, k: int, *, vocab: int = 32768, seed: int = 0) -> SyntheticTopK:
    """Top-k ids/log-probs whose statistics resemble a language-model teacher's."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(vocab).astype(np.int32)  # rank -> token id
    # Candidate ranks: half Zipf-like (frequent tokens), half uniform (context tokens).
    zipf = np.minimum(rng.zipf(1.3, size=(n_tokens, 2 * k)) - 1, vocab - 1)
    uniform = rng.integers(0, vocab, size=(n_tokens, 2 * k))
    cand = np.concatenate([zipf, uniform], axis=1)
    cand.sort(axis=1)
    dup = np.zeros_like(cand, dtype=bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    priority = rng.random(cand.shape)
    priority[:, : 2 * k] *= 0.5  # not used positionally; keeps ties random
    priority[dup] = np.inf
    pick = np.argsort(priority, axis=1)[:, :k]
    ranks = np.take_along_axis(cand, pick, axis=1)
    # Frequent tokens tend to rank higher: order entries by rank plus noise.
    order = np.argsort(np.log1p(ranks) + rng.normal(0, 2.0, ranks.shape), axis=1)
    ids = perm[np.take_along_axis(ranks, order, axis=1)]

    # Scores for k entries + 1 tail bucket, then a log-softmax over the k + 1 buckets.
    confident = rng.random(n_tokens) < 0.6
    top_gap = np.where(confident, rng.exponential(4.0, n_tokens) + 2.0, rng.exponential(0.8, n_tokens))
    steps = rng.exponential(0.25, (n_tokens, k - 1)) if k > 1 else np.zeros((n_tokens, 0))
    scores = np.concatenate([np.zeros((n_tokens, 1)), -(top_gap[:, None] + np.cumsum(steps, axis=1))], axis=1)
    tail_score = -top_gap + rng.normal(0.0, 1.0, n_tokens) + np.log(vocab) * 0.3
    allscores = np.concatenate([scores, tail_score[:, None]], axis=1)
    lse = np.logaddexp.reduce(allscores, axis=1, keepdims=True)
    logprobs = (scores - lse).astype(np.float32)
    tail = (tail_score - lse[:, 0]).astype(np.float32)
    target_col = np.minimum(rng.geometric(0.7, n_tokens) - 1, k - 1)
    targets = ids[np.arange(n_tokens), target_col]
    return SyntheticTopK(ids=ids.astype(np.int32), logprobs=logprobs, tail_logmass=tail, target_ids=targets.astype(np.int32))
