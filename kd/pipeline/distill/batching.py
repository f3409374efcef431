"""Batches for the student: right-padded inputs, teacher targets flattened over answer tokens, and
where each attention-map element sits in the student's padded maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kd.pipeline.common.model_inputs import batch_model_inputs
from kd.pipeline.distill.targets import DistillSample, SampleBatch, TeacherTargets


def collate(samples: Sequence[DistillSample], pad_id: int = 0) -> dict[str, Any]:
    """Right-padded student inputs plus teacher targets flattened over answer tokens.

    Row ``n`` of every token-level tensor is one answer token; sample ``b`` owns the
    ``num_tokens[b]`` consecutive rows starting at ``sum(num_tokens[:b])``, gathered at the input
    positions ``target_positions[b]`` (every supervised turn's, in order). Attention maps are
    flattened too (``flatten_maps``: every sample's ``[T_b, K_b]`` map, row-major, concatenated), and
    ``attention_layout[kind]`` says where each element sits in the student's padded maps. A
    ``SampleBatch`` (the DataLoader's batches of a ``DistillDataset``) brings its teachers' targets
    already in that form; they are used as they are.
    """
    b = len(samples)
    lengths = [len(s.input_ids) for s in samples]
    ids = torch.full((b, max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros((b, max(lengths)), dtype=torch.long)
    image_mask = torch.zeros((b, max(lengths)), dtype=torch.bool)
    for i, s in enumerate(samples):
        ids[i, : lengths[i]] = torch.from_numpy(s.input_ids)
        mask[i, : lengths[i]] = 1
        image_mask[i, : lengths[i]] = torch.from_numpy(s.image_token_mask)
    stacked = batch_model_inputs([s.model_inputs for s in samples], lengths)
    batch: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "image_mask": image_mask,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "answer_start": torch.tensor([s.answer_start for s in samples], dtype=torch.long),
        "num_tokens": torch.tensor([len(s.answer_ids) for s in samples], dtype=torch.long),
        # where each sample's rows sit in its input (several turns of a conversation: kd.cache_schema.turns)
        "target_positions": [torch.from_numpy(s.target_positions) for s in samples],
        "targets": torch.from_numpy(np.concatenate([s.answer_ids for s in samples])),
        "sample_ids": [s.sample_id for s in samples],
        "capabilities": [s.capability for s in samples],
        "model_inputs": None if stacked is None else {k: torch.from_numpy(v) for k, v in stacked.items()},
        "per_sample_inputs": None if stacked is not None else
        [{k: torch.from_numpy(v) for k, v in s.model_inputs.items()} for s in samples],
        "teachers": {},
        "attention_layout": {},
    }
    kinds = [kind for kind in ("t2v", "full") if any(getattr(t, f"attention_{kind}") for t in samples[0].teachers.values())]
    shapes = {kind: map_shapes(batch, kind) for kind in kinds}
    batch["attention_layout"] = {kind: attention_layout(batch, kind) for kind in kinds}
    read_together = samples.teachers if isinstance(samples, SampleBatch) else None
    for role in samples[0].teachers:
        if read_together is not None:  # rows already concatenated, maps flattened, shapes checked on read
            targets = read_together[role]
        else:
            targets = concat_targets([s.teachers[role] for s in samples], shapes, batch["sample_ids"], role)
        batch["teachers"][role] = _teacher_entry(targets, shapes, role)
    return batch


def concat_targets(ts: Sequence[TeacherTargets], shapes: Mapping[str, Sequence[tuple[int, int]]],
                   sample_ids: Sequence[str], role: str) -> TeacherTargets:
    """Several samples' targets as one batch's: rows concatenated (narrower rows padded to the widest
    with id -1 / log-prob -inf / count 0), maps flattened by ``flatten_maps`` against ``shapes``."""
    k = max(t.ids.shape[1] for t in ts)

    def entries(arrs: list[np.ndarray], value: float) -> np.ndarray:
        if any(a.shape[1] != k for a in arrs):  # only sampled caches have rows narrower than k
            arrs = [np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=value) for a in arrs]
        return np.concatenate(arrs)

    out = TeacherTargets(ids=entries([t.ids for t in ts], -1), logprobs=entries([t.logprobs for t in ts], -np.inf),
                         tail=np.concatenate([t.tail for t in ts]),
                         counts=None if ts[0].counts is None else entries([t.counts for t in ts], 0),
                         hidden={layer: np.concatenate([t.hidden[layer] for t in ts]) for layer in ts[0].hidden})
    for kind in ("t2v", "full"):
        for layer in getattr(ts[0], f"attention_{kind}"):
            getattr(out, f"attention_{kind}")[layer] = flatten_maps(
                [getattr(t, f"attention_{kind}")[layer] for t in ts], shapes[kind], sample_ids,
                f"teacher {role!r}: cached {kind} map")
    return out


def _teacher_entry(t: TeacherTargets, shapes: Mapping[str, Sequence[tuple[int, int]]], role: str) -> dict[str, Any]:
    """One teacher's part of a collated batch, as tensors of the dtypes the objective reads."""
    entry: dict[str, Any] = {
        "ids": torch.as_tensor(t.ids).long(),
        "logprobs": torch.as_tensor(t.logprobs).float(),
        "tail": torch.as_tensor(t.tail).float(),
        "hidden": {layer: torch.as_tensor(h).float() for layer, h in t.hidden.items()},
    }
    for kind in ("t2v", "full"):
        maps = entry[f"attention_{kind}"] = {}
        for layer, flat in getattr(t, f"attention_{kind}").items():
            expected = sum(rows * keys for rows, keys in shapes[kind])
            if flat.shape[0] != expected:
                raise ValueError(f"teacher {role!r}: cached {kind} maps of layer {layer} have {flat.shape[0]} elements, "
                                 f"the student's maps {expected}")
            maps[layer] = torch.as_tensor(flat).float()
    if t.counts is not None:
        entry["counts"] = torch.as_tensor(t.counts).float()
    return entry


def map_shapes(batch: Mapping[str, Any], kind: str) -> list[tuple[int, int]]:
    """Each sample's ``(answer tokens, keys)`` of a ``kind`` map: keys are its image tokens (t2v) or
    all its tokens (full), as the student's maps are read."""
    keys = batch["image_mask"].sum(1) if kind == "t2v" else batch["lengths"]
    return list(zip(batch["num_tokens"].tolist(), keys.tolist()))


def attention_layout(batch: Mapping[str, Any], kind: str) -> dict[str, torch.Tensor]:
    """Where the elements of flattened ``kind`` maps (``flatten_maps``) sit in the student's padded
    maps ``[B, T_max, S]`` (``StudentOutputs.attention_padded``): ``index`` ``[E]`` into their flat
    view and ``sample`` ``[E]``, the sample each element belongs to. Built on the CPU (in the loader,
    by ``collate``), so the training step only gathers."""
    num_tokens, lengths = batch["num_tokens"].tolist(), batch["lengths"].tolist()
    t_max, width = max(num_tokens), batch["input_ids"].shape[1]
    image = batch["image_mask"].cpu().numpy()  # False past each sample's length
    index = [np.add.outer(np.arange(b * t_max, b * t_max + t_b) * width,
                          np.flatnonzero(image[b]) if kind == "t2v" else np.arange(n)).ravel()
             for b, (t_b, n) in enumerate(zip(num_tokens, lengths))]
    sample = np.repeat(np.arange(len(index)), [len(i) for i in index])
    return {"index": torch.from_numpy(np.concatenate(index).astype(np.int64, copy=False)),
            "sample": torch.from_numpy(sample.astype(np.int64, copy=False))}


def flatten_maps(maps: Sequence[np.ndarray | torch.Tensor], shapes: Sequence[tuple[int, int]],
                 sample_ids: Sequence[str], what: str) -> torch.Tensor:
    """Every sample's ``[T_b, K_b]`` map (``shapes[b]``, from ``map_shapes``), row-major, concatenated
    into ``[E]`` float32 in ``attention_layout`` order; a map of another shape raises ``ValueError``."""
    for sid, m, shape in zip(sample_ids, maps, shapes):
        if tuple(m.shape) != shape:
            raise ValueError(f"sample {sid!r}, {what} {tuple(m.shape)} vs student {shape}")
    if all(isinstance(m, np.ndarray) for m in maps):  # the loader's case: one numpy call
        return torch.from_numpy(np.concatenate(maps, axis=None).astype(np.float32, copy=False))
    return torch.cat([torch.as_tensor(m).reshape(-1) for m in maps]).float()
