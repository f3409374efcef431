"""Samples of a 151936-token vocabulary (Qwen2.5 / InternVL3) for the id coding tests: enough rows
that a shard holds more than 65536 distinct ids, so its codes need ``ids_hi``."""

from __future__ import annotations

import numpy as np

from kd.cache_schema import SignalConfig
from kd.cache_schema.synthetic import teacher_like_topk
from kd.pipeline.build.signals import TeacherSignals

QWEN_VOCAB = 151_936


def large_vocab_samples(sig: SignalConfig, lengths=(3500, 2500), vocab: int = QWEN_VOCAB) -> list[TeacherSignals]:
    """``teacher_like_topk`` samples, with one -1 (padding) entry at -inf in each."""
    out = []
    for i, n in enumerate(lengths):
        syn = teacher_like_topk(n, sig.top_k, vocab=vocab, seed=10 + i)
        ids, lp = syn.ids.copy(), syn.logprobs.copy()
        ids[0, -1] = -1
        lp[0, -1] = -np.inf
        out.append(TeacherSignals(sample_id=f"s-{i}", target_ids=syn.target_ids, ids=ids, logprobs=lp,
                                  tail_logmass=syn.tail_logmass, answer_start=3,
                                  input_ids=np.concatenate([np.zeros(3, np.int32), syn.target_ids])))
    return out
