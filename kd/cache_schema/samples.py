"""What a read returns: one sample's signals (``CachedSample``), or a batch's as one array per
signal (``CachedBatch``) with each sample's rows found through ``SampleRows``."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .turns import single_turn, target_positions


@dataclass
class CachedSample:
    """One sample's cached teacher signals, decoded to float32 (see SPEC.md for the rows)."""

    sample_id: str
    capability: str
    target_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray
    answer_start: int
    seq_len: int
    input_ids_hash: str
    answer_ids_hash: str
    counts: np.ndarray | None = None
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    attention_t2v: dict[int, np.ndarray] = field(default_factory=dict)
    attention_full: dict[int, np.ndarray] = field(default_factory=dict)
    turn_starts: np.ndarray | None = None  # [n] each supervised turn's start (None: one turn at answer_start)
    turn_lengths: np.ndarray | None = None  # [n] its tokens

    def __post_init__(self) -> None:
        if self.turn_starts is None:
            self.turn_starts, self.turn_lengths = single_turn(self.answer_start, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.target_ids.shape[0])

    @property
    def target_positions(self) -> np.ndarray:
        """The input position each row belongs to (the one predicting its token; ``turns``)."""
        return target_positions(self.turn_starts, self.turn_lengths)


@dataclass
class CachedBatch:
    """Several samples' cached signals read together, one array per signal: token rows concatenated
    in request order (sample ``b`` owns rows ``offsets[b]:offsets[b + 1]``), and each attention map
    flattened row-major after the previous sample's (``attention_offsets``). A training loader
    reads a batch per teacher this way instead of a dozen small arrays per sample."""

    sample_ids: list[str]
    capabilities: list[str]
    num_tokens: np.ndarray  # [B] int64
    answer_start: np.ndarray  # [B] int64
    seq_len: np.ndarray  # [B] int64
    input_ids_hash: list[str]
    answer_ids_hash: list[str]
    target_ids: np.ndarray  # [N]
    ids: np.ndarray  # [N, k]
    logprobs: np.ndarray  # [N, k] float32
    tail_logmass: np.ndarray  # [N] float32
    counts: np.ndarray | None = None
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # [N, H] float32
    attention_keys: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [B] keys per sample
    attention_t2v: dict[int, np.ndarray] = field(default_factory=dict)  # flat [sum_b T_b * K_b] float32
    attention_full: dict[int, np.ndarray] = field(default_factory=dict)
    num_turns: np.ndarray | None = None  # [B] supervised turns per sample (None: one each)
    turn_starts: np.ndarray | None = None  # [sum num_turns] every sample's turn starts, in sample order
    turn_lengths: np.ndarray | None = None  # [sum num_turns]

    def __len__(self) -> int:
        return len(self.sample_ids)

    @cached_property
    def offsets(self) -> np.ndarray:
        """[B + 1] first token row of each sample, then the total."""
        return np.concatenate([[0], np.cumsum(self.num_tokens)])

    def attention_offsets(self, kind: str) -> np.ndarray:
        """[B + 1] first element of each sample's flattened ``kind`` map, then the total."""
        return np.concatenate([[0], np.cumsum(self.num_tokens * self.attention_keys[kind])])

    @cached_property
    def layout(self) -> list[SampleRows]:
        """Where each sample's rows and map elements lie in this batch's arrays."""
        tokens = self.offsets.tolist()
        maps = {kind: self.attention_offsets(kind).tolist() for kind in self.attention_keys}
        return [SampleRows(slice(tokens[b], tokens[b + 1]),
                           {kind: (slice(off[b], off[b + 1]), (tokens[b + 1] - tokens[b], int(self.attention_keys[kind][b])))
                            for kind, off in maps.items()})
                for b in range(len(self))]

    def sample(self, b: int) -> CachedSample:
        """Sample ``b`` as a ``CachedSample`` (views into this batch's arrays)."""
        rows = self.layout[b]
        t = rows.tokens
        out = CachedSample(
            sample_id=self.sample_ids[b], capability=self.capabilities[b], target_ids=self.target_ids[t],
            ids=self.ids[t], logprobs=self.logprobs[t], tail_logmass=self.tail_logmass[t],
            answer_start=int(self.answer_start[b]), seq_len=int(self.seq_len[b]),
            input_ids_hash=self.input_ids_hash[b], answer_ids_hash=self.answer_ids_hash[b],
            counts=None if self.counts is None else self.counts[t], hidden={layer: h[t] for layer, h in self.hidden.items()},
            **self._turns(b))
        rows.split_maps(self.attention_t2v, "t2v", out.attention_t2v)
        rows.split_maps(self.attention_full, "full", out.attention_full)
        return out


    def _turns(self, b: int) -> dict[str, np.ndarray]:
        if self.num_turns is None:
            return {}
        first = int(self.num_turns[:b].sum())
        end = first + int(self.num_turns[b])
        return {"turn_starts": self.turn_starts[first:end], "turn_lengths": self.turn_lengths[first:end]}


@dataclass(frozen=True)
class SampleRows:
    """One sample's part of a ``CachedBatch``: its token rows, and per attention kind its elements
    of the flattened maps with the ``[T_b, K_b]`` shape they unflatten to."""

    tokens: slice
    maps: dict[str, tuple[slice, tuple[int, int]]]

    def split_maps(self, flat: dict[int, np.ndarray], kind: str, into: dict[int, np.ndarray]) -> None:
        """This sample's ``[T_b, K_b]`` map (a view) of each layer's flattened ``kind`` maps, into ``into``."""
        if flat:
            elements, shape = self.maps[kind]
            for layer, values in flat.items():
                into[layer] = values[elements].reshape(shape)
