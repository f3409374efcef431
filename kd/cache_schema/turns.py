"""Answer turns: where a sample's cached token rows lie in its teacher-forced sequence (SPEC.md section 4).

A sample supervises one or more assistant turns (a multi-turn conversation supervises every
assistant turn in one sample). Turn ``i`` is the run of input positions
``turn_starts[i] .. turn_starts[i] + turn_lengths[i] - 1``; the sample's cached rows are the
turns' tokens in order, and row ``j`` belongs to the position that *predicts* its token, one
before it. A single-turn sample has one turn, starting at ``answer_start``.

Kept in the schema layer because the cache, the teacher engines and the student all place
rows by this one rule.
"""

from __future__ import annotations

import numpy as np


def target_positions(turn_starts: np.ndarray, turn_lengths: np.ndarray) -> np.ndarray:
    """``[T]`` int64: the input position predicting each supervised token (``start - 1 + j`` per turn)."""
    starts = np.asarray(turn_starts, np.int64)
    lengths = np.asarray(turn_lengths, np.int64)
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    return np.repeat(starts - 1 - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def token_positions(turn_starts: np.ndarray, turn_lengths: np.ndarray) -> np.ndarray:
    """``[T]`` int64: the input position of each supervised token."""
    return target_positions(turn_starts, turn_lengths) + 1


def turn_problem(turn_starts: np.ndarray, turn_lengths: np.ndarray, seq_len: int) -> str | None:
    """Why these turns cannot belong to a sequence of ``seq_len`` tokens, or None when they can.

    Turns must be non-empty, in order, apart, and after the first token (a row predicts its
    token from the position before it).
    """
    starts, lengths = np.asarray(turn_starts, np.int64), np.asarray(turn_lengths, np.int64)
    if starts.shape != lengths.shape or starts.ndim != 1 or len(starts) == 0:
        return f"turn_starts {starts.tolist()} / turn_lengths {lengths.tolist()} must be two equal, non-empty lists"
    if (lengths < 1).any():
        return f"turn_lengths {lengths.tolist()} hold an empty turn"
    ends = starts + lengths
    if starts[0] < 1 or ends[-1] > seq_len or (starts[1:] < ends[:-1]).any():
        return (f"turns at {starts.tolist()} of lengths {lengths.tolist()} are not in order, apart and inside "
                f"positions 1..{seq_len - 1}")
    return None


def single_turn(answer_start: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(turn_starts, turn_lengths)`` of a sample without turn columns: one turn of all its
    ``num_tokens`` tokens at ``answer_start`` (a single answer, or a cache before schema_version 5)."""
    return np.array([int(answer_start)], np.int64), np.array([int(num_tokens)], np.int64)


def turns_of(sample: object) -> tuple[np.ndarray, np.ndarray]:
    """``(turn_starts, turn_lengths)`` of a sample object: its own, or ``single_turn``'s."""
    starts = getattr(sample, "turn_starts", None)
    if starts is not None:
        return np.asarray(starts, np.int64), np.asarray(getattr(sample, "turn_lengths"), np.int64)
    return single_turn(getattr(sample, "answer_start"), len(getattr(sample, "target_ids")))
