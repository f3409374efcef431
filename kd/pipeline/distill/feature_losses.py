"""Feature losses over cached teacher signals: hidden states through learned projectors, head-averaged
attention maps, and the layer maps that pair student layers with teacher layers (Drive-KD's choices).
Rows follow the same flattened convention as ``logit_losses``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


from kd.pipeline.distill.logit_losses import compute_dtype, reduce_rows


class HiddenProjector(nn.Module):
    """Learned linear maps from student width to teacher width, one per student layer.

    The widths of two families rarely match, and one shared map would tie layers together. Index
    the module with a student layer (``proj[s]``) to get that layer's ``nn.Linear``, or call
    ``proj(h, s)``. Without ``student_layers`` there is a single map, and ``proj(h)`` uses it.
    When the widths are equal, every map starts as the identity, so training starts from plain
    matching.
    """

    def __init__(
        self, student_width: int, teacher_width: int, student_layers: Sequence[int] | None = None, bias: bool = True
    ) -> None:
        super().__init__()
        layers = list(student_layers) if student_layers is not None else [0]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"student_layers must be non-empty and distinct, got {layers}")
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.maps = nn.ModuleDict({str(s): nn.Linear(student_width, teacher_width, bias=bias) for s in layers})
        if student_width == teacher_width:
            with torch.no_grad():
                for lin in self.maps.values():
                    lin.weight.copy_(torch.eye(teacher_width))
                    if lin.bias is not None:
                        lin.bias.zero_()

    def __getitem__(self, student_layer: int) -> nn.Linear:
        key = str(student_layer)
        if key not in self.maps:
            raise KeyError(f"no projector for student layer {student_layer}; have {sorted(self.maps, key=int)}")
        return self.maps[key]  # type: ignore[return-value]

    def forward(self, h: Tensor, student_layer: int | None = None) -> Tensor:
        if student_layer is None:
            if len(self.maps) != 1:
                raise ValueError("several layer projectors: pass student_layer")
            return next(iter(self.maps.values()))(h)
        return self[student_layer](h)


def hidden_state_loss(
    student_h: Tensor,
    teacher_h: Tensor,
    projector: nn.Module | Callable[[Tensor], Tensor] | None,
    kind: Literal["mse", "cosine"] = "mse",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Match projected student hidden states ``[N, Hs]`` to teacher ones ``[N, Ht]`` (teacher detached).

    ``mse`` averages over all elements. ``cosine`` is ``1 - cos`` averaged over rows, so it is
    scale-free: useful when the teacher's hidden-state norms are far larger than the student's.
    ``projector=None`` is allowed only when the widths match. ``reduction="none"`` returns the
    per-row losses ``[N]`` (mse: mean over the row's elements), whose mean is the ``"mean"`` result:
    a batch is projected once and weighted per row, instead of once per sample.
    """
    if student_h.ndim != 2 or teacher_h.ndim != 2 or student_h.shape[0] != teacher_h.shape[0]:
        raise ValueError(f"student_h {tuple(student_h.shape)} / teacher_h {tuple(teacher_h.shape)} must be [N, H]")
    if projector is None:
        if student_h.shape[1] != teacher_h.shape[1]:
            raise ValueError(f"widths differ ({student_h.shape[1]} vs {teacher_h.shape[1]}): pass a projector")
        proj = student_h
    else:
        proj = projector(student_h)
    target = teacher_h.detach().to(proj.dtype)
    if proj.shape != target.shape:
        raise ValueError(f"projected student {tuple(proj.shape)} != teacher {tuple(target.shape)}")
    if kind == "mse" and reduction == "mean":
        return F.mse_loss(proj, target)
    return reduce_rows(_hidden_rows(proj, target, kind), reduction)


def _hidden_rows(proj: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-row hidden loss over the last dim (any leading dims): mse = mean square, cosine = 1 - cos."""
    if kind == "mse":
        return (proj - target).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(proj, target, dim=-1)
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")


def stacked_hidden_state_rows(
    student_h: Sequence[Tensor],
    teacher_h: Sequence[Tensor],
    projectors: Sequence[nn.Linear],
    kind: Literal["mse", "cosine"] = "mse",
) -> Tensor:
    """``hidden_state_loss(..., reduction="none")`` of ``P`` (student, teacher, projector) pairs at once:
    ``[P, N]``. The pairs share ``N`` and the teacher width; one batched matmul projects them all
    (instead of ``P`` linear layers and ``P`` loss graphs, which dominate on a small student)."""
    if not (len(student_h) == len(teacher_h) == len(projectors)) or not projectors:
        raise ValueError(f"need as many student / teacher states as projectors, got {len(student_h)} / "
                         f"{len(teacher_h)} / {len(projectors)}")
    h, target = torch.stack(list(student_h)), torch.stack([t.detach() for t in teacher_h])
    weight = torch.stack([p.weight for p in projectors]).transpose(1, 2)  # [P, Hs, Ht]
    if any(p.bias is None for p in projectors):
        proj = torch.bmm(h, weight)
    else:
        proj = torch.baddbmm(torch.stack([p.bias for p in projectors]).unsqueeze(1), h, weight)
    if proj.shape != target.shape:
        raise ValueError(f"projected student {tuple(proj.shape)} != teacher {tuple(target.shape)}")
    return _hidden_rows(proj, target.to(proj.dtype), kind)


def layer_map(student_layers: int, teacher_layers: Sequence[int], teacher_depth: int | None = None) -> dict[int, int]:
    """Uniform depth mapping ``{student layer: teacher layer}`` for hidden-state matching.

    Layers use the hidden-state convention (0 = embeddings, ``L`` = last block). Teacher layer
    ``t`` goes to student layer ``round(t * student_layers / teacher_depth)``, with ``teacher_depth``
    defaulting to ``max(teacher_layers)``, so the last goes to the last. Two teacher layers that
    land on the same student layer keep only the closer one (the deeper one on a tie), so every
    student layer gets one target.
    """
    if student_layers < 1 or not teacher_layers:
        raise ValueError(f"need student_layers >= 1 and some teacher layers, got {student_layers}, {teacher_layers}")
    depth = int(teacher_depth if teacher_depth is not None else max(teacher_layers))
    if depth < 1 or min(teacher_layers) < 0 or max(teacher_layers) > depth:
        raise ValueError(f"teacher layers {list(teacher_layers)} must lie in [0, teacher_depth={depth}]")
    best: dict[int, tuple[float, int]] = {}
    for t_layer in sorted(set(teacher_layers)):
        pos = t_layer * student_layers / depth
        s = min(student_layers, math.floor(pos + 0.5))
        dist = abs(pos - s)
        if s not in best or dist <= best[s][0]:
            best[s] = (dist, t_layer)
    return {s: t for s, (_, t) in sorted(best.items())}


def attention_map_loss(student_maps: Tensor, teacher_maps: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked MSE between head-averaged attention maps ``[N, K]`` (Drive-KD).

    ``mask`` (bool or 0/1) broadcasts to ``[N, K]``, e.g. ``[K]`` to keep image keys or ``[N, 1]``
    to keep rows. The loss is the mean over the kept elements of the whole batch, so each token
    counts equally. Drive-KD averages per sample first. Without a mask it is a plain mean. If
    nothing is kept, the result is a zero that still carries a graph to the student.
    """
    if student_maps.shape != teacher_maps.shape or student_maps.ndim != 2:
        raise ValueError(
            f"student {tuple(student_maps.shape)} / teacher {tuple(teacher_maps.shape)} maps must be the same [N, K]"
            " (teacher and student token sequences must match)"
        )
    dt = compute_dtype(student_maps)
    sq = (student_maps.to(dt) - teacher_maps.detach().to(dt)).pow(2)
    if mask is None:
        return sq.mean() if sq.numel() else sq.sum()
    m = torch.broadcast_to(mask.to(sq.dtype), sq.shape)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def padded_attention_map_loss(student_maps: Tensor, teacher_maps: Tensor, mask: Tensor) -> Tensor:
    """Per-sample masked MSE ``[B]`` of padded attention maps ``[B, T, K]`` (teacher detached).

    Sample ``b``'s loss is the mean over its kept elements (``mask[b]``), i.e. exactly
    ``attention_map_loss`` of its unpadded ``[T_b, K_b]`` maps, but for the whole batch in a few
    tensor ops (one autograd node per op, not per sample). A sample with nothing kept gets 0.
    """
    if student_maps.ndim != 3 or student_maps.shape != teacher_maps.shape or mask.shape != student_maps.shape:
        raise ValueError(f"student {tuple(student_maps.shape)} / teacher {tuple(teacher_maps.shape)} / mask "
                         f"{tuple(mask.shape)} must all be the same [B, T, K]")
    index = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    per_sample = student_maps[0].numel()
    return segment_attention_map_loss(student_maps, teacher_maps.reshape(-1)[index], index,
                                      torch.div(index, max(per_sample, 1), rounding_mode="floor"), len(student_maps))


def segment_attention_map_loss(student_maps: Tensor, teacher_values: Tensor, index: Tensor, segment: Tensor,
                               segments: int) -> Tensor:
    """Per-segment MSE ``[segments]`` of attention-map elements given by position (teacher detached).

    Element ``e`` compares ``student_maps.reshape(-1)[index[e]]`` with ``teacher_values[e]`` and
    belongs to segment ``segment[e]``; a segment's loss is the mean over its elements (0 with none).
    The kept elements of many maps (samples x layers x teachers) go through one gather, one squared
    difference and one segment sum, and the cached maps are never padded to the student's layout.
    """
    if index.shape != teacher_values.shape or segment.shape != index.shape or index.ndim != 1:
        raise ValueError(f"index {tuple(index.shape)} / teacher_values {tuple(teacher_values.shape)} / segment "
                         f"{tuple(segment.shape)} must all be the same [E]")
    dt = compute_dtype(student_maps)
    sq = (student_maps.reshape(-1)[index].to(dt) - teacher_values.detach().to(dt)).pow(2)
    total = sq.new_zeros(segments).index_add(0, segment, sq)
    return total / torch.bincount(segment, minlength=segments).to(dt).clamp_min(1.0)


def group_teacher_layers(student_layers: Sequence[int], teacher_layers: Sequence[int]) -> dict[int, list[int]]:
    """Drive-KD layer-group matching ``{student layer: teacher layers to average}`` for full maps.

    With ``k`` student and ``m`` teacher layers (each in depth order), the i-th student layer
    takes the window of ``g = max(1, m - k + 1)`` consecutive teacher layers that starts at index
    ``min(i, m - g)``. Every teacher layer is then used, and a deeper teacher is compressed
    without skipping layers.
    """
    s, t = list(student_layers), list(teacher_layers)
    if not s or not t:
        return {}
    g = max(1, len(t) - len(s) + 1)
    return {layer: t[min(i, len(t) - g) : min(i, len(t) - g) + g] for i, layer in enumerate(s)}


def group_mean_maps(teacher_maps: Mapping[int, Tensor], groups: Mapping[int, Sequence[int]]) -> dict[int, Tensor]:
    """Average the teacher maps of each group: ``{student layer: mean of its teacher layers}``."""
    out: dict[int, Tensor] = {}
    for s, layers in groups.items():
        missing = [layer for layer in layers if layer not in teacher_maps]
        if missing or not layers:
            raise KeyError(f"student layer {s}: teacher maps missing for layers {missing or '(empty group)'}")
        out[s] = torch.stack([teacher_maps[layer].float() for layer in layers]).mean(0)
    return out


def default_attention_layers(num_layers: int) -> dict[str, tuple[str, list[int]]]:
    """Drive-KD's default layers per capability for a model with ``num_layers`` blocks.

    Attention layers are 0-based block indices, as in transformers' ``attentions[i]``:
    ``perception`` is the text-to-vision map of the first layer, ``planning`` the text-to-vision
    map of the penultimate layer, and ``reasoning`` the full maps of layers ``0 .. L-2``, which
    ``group_teacher_layers`` pairs between student and teacher.
    """
    if num_layers < 2:
        raise ValueError(f"need at least 2 layers (penultimate layer for planning), got {num_layers}")
    return {
        "perception": ("t2v", [0]),
        "planning": ("t2v", [num_layers - 2]),
        "reasoning": ("full", list(range(num_layers - 1))),
    }
