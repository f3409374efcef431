"""What a shard writer refuses to cache: a sample whose arrays are empty, broken (NaN) or disagree
with the cache's signals. Kept apart from ``writer`` so the write protocol reads on its own."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .manifest import SignalConfig
from .turns import token_positions, turn_problem, turns_of


class SampleSignals(Protocol):
    """What a shard writer needs of one sample (``kd.pipeline.build.signals.TeacherSignals`` fits)."""

    sample_id: str
    target_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray
    counts: np.ndarray | None
    input_ids: np.ndarray
    answer_start: int  # the first turn's start; ``turn_starts`` / ``turn_lengths`` (optional) give every turn
    hidden: dict[int, np.ndarray]
    attention_t2v: dict[int, np.ndarray]
    attention_full: dict[int, np.ndarray]


def check_sample(s: SampleSignals, sig: SignalConfig) -> None:
    """Raise ``ValueError`` naming the sample and field when ``s`` cannot be cached as is."""
    where = f"sample {s.sample_id!r}"
    if hasattr(s, "validate"):
        s.validate()
    if len(s.target_ids) == 0:
        raise ValueError(f"{where}: empty answer (0 answer tokens) cannot be cached")
    starts, lengths = turns_of(s)
    problem = turn_problem(starts, lengths, len(s.input_ids))
    if problem is None and int(lengths.sum()) != len(s.target_ids):
        problem = f"turn_lengths {lengths.tolist()} sum to {int(lengths.sum())}, not the {len(s.target_ids)} answer tokens"
    if problem is None and not np.array_equal(np.asarray(s.input_ids)[token_positions(starts, lengths)], s.target_ids):
        problem = "target_ids are not the input ids at the turns' positions"
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    if starts[0] != s.answer_start:
        raise ValueError(f"{where}: answer_start {s.answer_start} is not the first turn's start {int(starts[0])}")
    if s.ids.shape[1] != sig.top_k:
        raise ValueError(f"{where}: ids have {s.ids.shape[1]} columns, signal config says top_k={sig.top_k}")
    for field in ("logprobs", "tail_logmass"):  # a broken teacher (overflow) must not be cached as data
        bad = np.isnan(np.asarray(getattr(s, field), np.float32))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{where}: {field} has NaN (first at answer token {row}); the teacher's outputs are broken")
    ranked = np.sort(np.asarray(s.ids), axis=1)  # a top-k (or the distinct sampled ids): no id twice in a row
    dup = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
    if dup.any():
        row = int(np.argwhere(dup)[0][0])
        raise ValueError(f"{where}: ids repeat token {int(ranked[row][1:][dup[row]][0])} at answer token {row}; "
                         "a row's ids must be distinct")
    if sig.logits == "sampled" and s.counts is None:
        raise ValueError(f"{where}: sampled logits need counts")
    for layer in sig.hidden_layers:
        if layer not in s.hidden:
            raise ValueError(f"{where}: hidden state of layer {layer} missing")
    for kind in sig.attention_kinds:
        maps = s.attention_t2v if kind == "t2v" else s.attention_full
        for layer in sig.attention_layers:
            if layer not in maps:
                raise ValueError(f"{where}: {kind} attention map of layer {layer} missing")
