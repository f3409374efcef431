"""The one per-sample output every teacher engine returns and the cache writer stores.

Position convention (the same in the cache, the engines and the losses): row ``j`` of every
token-level array belongs to the input position that *predicts* answer token ``j``, i.e.
position ``answer_start - 1 + j`` of the full teacher-forced sequence; with several supervised
turns (``turn_starts`` / ``turn_lengths``), the rows are the turns' tokens in order, each at the
position before its token (``kd.cache_schema.turns``). A student gathers its logits, hidden
states and attention rows at exactly those positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kd.cache_schema.turns import token_positions, turn_problem, turns_of


@dataclass
class TeacherSignals:
    """Teacher outputs for the ``T`` answer tokens of one sample.

    Attributes:
        sample_id: the dataset record's id.
        target_ids: ``[T]`` int32, the answer token ids (teacher forcing targets).
        ids: ``[T, k]`` int32, top-k token ids sorted by descending log-prob
            (``logits=sampled``: the distinct sampled ids, padded with -1).
        logprobs: ``[T, k]`` float32, raw teacher log-probs (log-softmax at temperature 1) of ``ids``;
            padding entries are ``-inf``.
        tail_logmass: ``[T]`` float32, ``log(1 - sum(exp(logprobs)))``, the mass outside the top-k
            (``-inf`` when the top-k covers everything). Unused for ``logits=sampled``.
        counts: ``[T, k]`` uint16 draw counts for ``logits=sampled``; ``None`` for top-k.
        input_ids: ``[S]`` int32, the full teacher-forced input ids (prompt, image tokens, answer).
        answer_start: index in ``input_ids`` of the first answer token.
        turn_starts / turn_lengths: ``[n]`` int64, each supervised turn's first index in
            ``input_ids`` and its token count (``None``: one turn of all ``T`` tokens at ``answer_start``).
        hidden: layer id -> ``[T, H]`` float32 hidden states (layer 0 = embeddings, as transformers'
            ``hidden_states[i]``).
        attention_t2v: layer id -> ``[T, V]`` float32 head-averaged attention of each answer
            query over the ``V`` image-token keys.
        attention_full: layer id -> ``[T, S]`` float32 head-averaged attention over all ``S`` keys.
    """

    sample_id: str
    target_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray
    input_ids: np.ndarray
    answer_start: int
    counts: np.ndarray | None = None
    turn_starts: np.ndarray | None = None
    turn_lengths: np.ndarray | None = None
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    attention_t2v: dict[int, np.ndarray] = field(default_factory=dict)
    attention_full: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.target_ids.shape[0])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the sample and field when shapes disagree."""
        t = self.num_tokens
        where = f"sample {self.sample_id!r}"
        if t == 0:
            raise ValueError(f"{where}: empty answer (0 answer tokens)")
        if self.ids.shape != self.logprobs.shape or self.ids.ndim != 2 or self.ids.shape[0] != t:
            raise ValueError(f"{where}: ids {self.ids.shape} / logprobs {self.logprobs.shape} must be [{t}, k]")
        if self.tail_logmass.shape != (t,):
            raise ValueError(f"{where}: tail_logmass shape {self.tail_logmass.shape} != ({t},)")
        if self.counts is not None and self.counts.shape != self.ids.shape:
            raise ValueError(f"{where}: counts shape {self.counts.shape} != ids shape {self.ids.shape}")
        starts, lengths = turns_of(self)
        problem = turn_problem(starts, lengths, len(self.input_ids))
        if problem is not None or starts[0] != self.answer_start or int(lengths.sum()) != t:
            raise ValueError(f"{where}: answer_start {self.answer_start} / turns inconsistent with "
                             f"{len(self.input_ids)} input ids and {t} answer tokens{': ' + problem if problem else ''}")
        if not np.array_equal(self.input_ids[token_positions(starts, lengths)], self.target_ids):
            raise ValueError(f"{where}: target_ids are not the answer turns of input_ids")
        for name, maps in (("hidden", self.hidden), ("attention_t2v", self.attention_t2v), ("attention_full", self.attention_full)):
            for layer, arr in maps.items():
                if arr.ndim != 2 or arr.shape[0] != t:
                    raise ValueError(f"{where}: {name}[{layer}] shape {arr.shape} must be [{t}, ...]")


def sample_fields(s) -> dict:
    """The fields of a ``TeacherSignals`` that come from the encoded sample (``EncodedSample``) itself."""
    return dict(sample_id=s.sample_id, target_ids=s.answer_ids.copy(), input_ids=s.input_ids.copy(),
                answer_start=s.answer_start, turn_starts=s.turn_starts.copy(), turn_lengths=s.turn_lengths.copy())
