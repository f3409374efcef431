"""The processor's extra model inputs (pixels, grids, per-token types): one sample's, and a batch's.

Processors return two kinds of extra inputs, and batching them wrongly is silent (a forward that
drops ``pixel_values`` still runs, on the image tokens' bare embeddings):

- **per-token** inputs (``token_type_ids`` in Gemma 3, ``mm_token_type_ids`` in Qwen2-VL /
  Qwen2.5-VL / Qwen3-VL, ...): ``[1, S]``, one entry per input id. The processor makes them for the
  prompt; a teacher-forced sequence also holds the answer, whose tokens are text (type 0), so
  ``extend_per_token`` appends zeros. Batches pad them like ``input_ids``.
- **per-image** inputs (``pixel_values``, ``image_grid_thw``, ``image_sizes``, ...): their leading
  dim counts images, tiles or patches (Qwen: ``[patches, C]``; InternVL: ``[tiles, 3, H, W]``), or it
  is a batch dim of 1 (Idefics3 / SmolVLM: ``[1, images, 3, H, W]`` plus ``pixel_attention_mask``).
  A batch concatenates them along dim 0 in sample order, which is what the processors themselves
  return for a batch; Idefics3-style inputs of different image counts are zero-padded as that
  processor pads them (the pixel mask marks real pixels, all-zero images are dropped).

Anything else cannot share a forward, and ``batch_model_inputs`` says so (``None``): the caller
then runs those samples one at a time, each with its own inputs, never without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

PIXEL_MASK = "pixel_attention_mask"


def is_per_token(name: str) -> bool:
    """Whether a processor output holds one entry per input id (``*token_type_ids``)."""
    return name.endswith("token_type_ids")


def extend_per_token(model_inputs: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Per-token inputs padded with 0 (text) from the prompt's length to ``length`` ids."""
    out = {}
    for name, arr in model_inputs.items():
        if is_per_token(name):
            if arr.ndim != 2 or arr.shape[0] != 1 or arr.shape[1] > length:
                raise ValueError(f"{name}: shape {arr.shape} is not [1, <= {length}] (one entry per prompt id)")
            arr = np.pad(arr, ((0, 0), (0, length - arr.shape[1])))
        out[name] = arr
    return out


def truncate_per_token(model_inputs: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Per-token inputs cut to the first ``length`` ids (a prompt without its answer, for generation)."""
    return {name: arr[:, :length] if is_per_token(name) else arr for name, arr in model_inputs.items()}


def batch_model_inputs(per_sample: Sequence[Mapping[str, np.ndarray]], lengths: Sequence[int], *,
                       padding_side: Literal["right", "left"] = "right") -> dict[str, np.ndarray] | None:
    """One batch's extra inputs from each sample's (see the module docstring); ``None`` when they
    cannot share a forward (different keys, or per-image inputs of different trailing shapes
    without a pixel mask). ``lengths`` are the samples' sequence lengths; per-token inputs are
    padded to their max on ``padding_side``, as the input ids are."""
    keys = {tuple(sorted(m)) for m in per_sample}
    if len(keys) != 1:
        return None
    names = keys.pop()
    out: dict[str, np.ndarray] = {}
    for name in names:
        arrs = [np.asarray(m[name]) for m in per_sample]
        if is_per_token(name):
            out[name] = _pad_per_token(name, arrs, lengths, padding_side)
        elif len({a.shape[1:] for a in arrs}) == 1:
            out[name] = np.concatenate(arrs, axis=0)
        elif PIXEL_MASK in names and all(a.shape[0] == 1 for a in arrs) and len({a.ndim for a in arrs}) == 1:
            out[name] = _zero_pad_stack(arrs)
        else:
            return None
    return out


def _pad_per_token(name: str, arrs: list[np.ndarray], lengths: Sequence[int], side: str) -> np.ndarray:
    width = max(lengths)
    out = np.zeros((len(arrs), width), dtype=arrs[0].dtype)
    for b, (a, n) in enumerate(zip(arrs, lengths)):
        if a.shape != (1, n):
            raise ValueError(f"{name}: sample {b} has shape {a.shape}, expected (1, {n}): one entry per input id")
        if side == "right":
            out[b, :n] = a[0]
        else:
            out[b, width - n :] = a[0]
    return out


def _zero_pad_stack(arrs: list[np.ndarray]) -> np.ndarray:
    shape = tuple(max(a.shape[d] for a in arrs) for d in range(arrs[0].ndim))
    out = np.zeros((len(arrs),) + shape[1:], dtype=arrs[0].dtype)
    for i, a in enumerate(arrs):
        out[(i,) + tuple(slice(0, n) for n in a.shape[1:])] = a[0]
    return out
