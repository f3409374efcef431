"""The student: loading it, and a teacher-forced forward that returns what the losses need.

The forward mirrors the transformers teacher engine (``engines/hf_engine.py``) position for
position: right-padded batch, only the answer-predicting positions (``answer_start - 1 + j``; each
turn's, for a conversation) go
through the LM head, hidden states come from ``hidden_states[layer]`` (0 = embeddings, ``L`` =
final normed output) and attention maps are head-averaged softmax weights captured by a forward
hook on each decoder layer's ``self_attn``: with ``MAPS_ATTENTION`` (sdpa, plus the weights of the
answer-predicting rows of the hooked layers only) or eager attention (all weights of all layers).
Unlike the engine, everything keeps its graph so the losses train the student.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.pipeline.common.model_files import num_text_layers

__all__ = ["MAPS_ATTENTION", "StudentOutputs", "load_student", "student_dims", "student_forward", "use_map_attention"]


@dataclass
class StudentOutputs:
    """Student outputs at the answer-predicting positions, rows in batch order (see ``data.collate``).

    ``logits``: ``[N, V]``; ``hidden``: layer -> ``[N, H]``; ``attention_padded``: layer -> the
    head-averaged maps as one ``[B, T_max, S]`` tensor (row ``j`` of sample ``b`` predicts its answer
    token ``j``; ``S`` is the batch's padded width; rows ``>= T_b`` and keys ``>= S_b`` are padding),
    which lets the objective compute every sample's attention loss in a few batched ops;
    ``attention``: the same as per-sample ``[T_b, S_b]`` maps over each sample's own keys (views,
    made on access: the objective reads only the padded maps). ``num_tokens`` / ``lengths``: ``T_b`` / ``S_b``.
    """

    logits: Tensor
    hidden: dict[int, Tensor] = field(default_factory=dict)
    attention_padded: dict[int, Tensor] = field(default_factory=dict)
    num_tokens: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def attention(self) -> dict[int, list[Tensor]]:
        return {layer: [m[b, :t, :n] for b, (t, n) in enumerate(zip(self.num_tokens, self.lengths))]
                for layer, m in self.attention_padded.items()}


# Attention maps without eager attention: every layer runs sdpa, and the layers whose maps a loss
# needs also compute softmax(q k^T) for the answer-predicting query rows only. Eager attention would
# materialise [B, heads, S, S] weights in every layer (kept for backward), for maps of one or two layers.
MAPS_ATTENTION = "kd_sdpa_maps"


def _sdpa_with_maps(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """transformers attention function: sdpa's output, plus ``[B, heads, R, S]`` softmax weights of
    the query rows ``module._kd_keep`` (set by ``student_forward`` on the layers it reads)."""
    from transformers.integrations.sdpa_attention import (
        repeat_kv,
        sdpa_attention_forward,
    )

    every_row = kwargs.pop("output_attentions", False)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    keep = getattr(module, "_kd_keep", None)
    if keep is None:
        if not every_row:
            return out, None
        keep = torch.arange(query.shape[2], device=query.device)  # output_attentions: every row, as eager
    k = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query[:, :, keep], k.transpose(2, 3)).float() * scale  # [B, H, R, S]
    low = torch.finfo(scores.dtype).min  # as eager: a fully masked (padding) row stays finite
    if attention_mask is None:  # sdpa's causal shortcut (no padding in the batch)
        allowed = torch.arange(k.shape[2], device=keep.device)[None, :] <= keep[:, None]
        scores = scores.masked_fill(~allowed, low)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, keep, : k.shape[2]], low)
    else:
        scores = scores + attention_mask[:, :, keep, : k.shape[2]].float()
    return out, torch.softmax(scores, dim=-1)


def use_map_attention(model: nn.Module) -> None:
    """Switch ``model`` to ``MAPS_ATTENTION`` (registered with transformers on first use)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(MAPS_ATTENTION, _sdpa_with_maps)
    AttentionMaskInterface.register(MAPS_ATTENTION, sdpa_mask)
    model.set_attn_implementation(MAPS_ATTENTION)


def load_student(model_dir: str | Path, *, attention: bool = False, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load the student model and its processor (a tokenizer for text-only models).

    ``attention=True`` selects ``MAPS_ATTENTION`` (sdpa plus the attention-map rows the loss needs);
    ``student_forward`` also switches to it by itself when asked for attention maps.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    is_vlm = getattr(config, "vision_config", None) is not None
    model_cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    proc_cls = AutoProcessor if is_vlm else AutoTokenizer
    processor = proc_cls.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = model_cls.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                      attn_implementation="sdpa")
    if attention:
        use_map_attention(model)
    return model, processor


def student_dims(model: nn.Module) -> tuple[int, int]:
    """(decoder layers, hidden width) of the language model."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return num_text_layers(cfg), int(text.hidden_size)


def _positions(batch: dict[str, Any]) -> list[Tensor]:
    """Each sample's answer-predicting positions: ``collate``'s ``target_positions`` (every turn's), or
    one run from ``answer_start`` for a batch made without them."""
    if batch.get("target_positions") is not None:
        return [p.long() for p in batch["target_positions"]]
    return [torch.arange(int(a) - 1, int(a) - 1 + int(t)) for a, t in zip(batch["answer_start"], batch["num_tokens"])]


def student_forward(model: nn.Module, batch: dict[str, Any], *, hidden_layers: Iterable[int] = (),
                    attention_layers: Iterable[int] = ()) -> StudentOutputs:
    """Teacher-forced forward of a collated batch; gathers logits, hidden states and attention rows."""
    hidden_layers, attention_layers = sorted(set(hidden_layers)), sorted(set(attention_layers))
    if batch.get("model_inputs") is not None or batch.get("per_sample_inputs") is None:
        return _forward(model, batch["input_ids"], batch["attention_mask"], batch.get("model_inputs") or {},
                        _positions(batch), batch["lengths"].tolist(), hidden_layers, attention_layers)
    # Processor outputs that cannot be stacked (e.g. a different number of images): one forward each.
    parts = []
    for b, (pos, extra) in enumerate(zip(_positions(batch), batch["per_sample_inputs"])):
        n = int(batch["lengths"][b])
        parts.append(_forward(model, batch["input_ids"][b : b + 1, :n], batch["attention_mask"][b : b + 1, :n],
                              extra, [pos], [n], hidden_layers, attention_layers))
    rows, width = int(batch["num_tokens"].max()), batch["input_ids"].shape[1]

    def pad(m: Tensor) -> Tensor:  # [1, T_b, S_b] -> [1, T_max, S]
        return F.pad(m, (0, width - m.shape[2], 0, rows - m.shape[1]))

    return StudentOutputs(
        logits=torch.cat([p.logits for p in parts]),
        hidden={layer: torch.cat([p.hidden[layer] for p in parts]) for layer in hidden_layers},
        attention_padded={layer: torch.cat([pad(p.attention_padded[layer]) for p in parts])
                          for layer in attention_layers},
        num_tokens=[n for p in parts for n in p.num_tokens], lengths=[n for p in parts for n in p.lengths],
    )


def _forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, extra: dict[str, Tensor],
             positions: list[Tensor], lengths: list[int], hidden_layers: list[int],
             attention_layers: list[int]) -> StudentOutputs:
    device = input_ids.device
    keep = torch.unique(torch.cat(positions)).to(device)  # sorted
    rows = [torch.searchsorted(keep, p.to(device)) for p in positions]
    store: dict[int, Tensor] = {}
    hooks = []
    modules = []
    if attention_layers:
        eager = model.config._attn_implementation == "eager"
        if not eager and model.config._attn_implementation != MAPS_ATTENTION:
            use_map_attention(model)
        modules = [model.get_decoder().layers[i].self_attn for i in attention_layers]

        def make(layer: int):
            def hook(_mod, _inp, output):
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError(f"layer {layer}: attention weights were not returned (the model's attention "
                                       f"does not go through transformers' attention functions?); load it with "
                                       f"attn_implementation='eager'")
                weights = weights.float().mean(dim=1)  # [B, |keep|, S] or, eager, [B, S, S]
                store[layer] = weights[:, keep, :] if eager else weights
            return hook

        for layer, mod in zip(attention_layers, modules):
            if not eager:
                mod._kd_keep = keep
            hooks.append(mod.register_forward_hook(make(layer)))
    dtype = next(model.parameters()).dtype
    extra = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in extra.items()}
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(hidden_layers),
                    use_cache=False, logits_to_keep=keep, **extra)
    finally:
        for h in hooks:
            h.remove()
        for mod in modules:
            mod.__dict__.pop("_kd_keep", None)
    logits = _flat_rows(out.logits, rows)
    hidden_rows = _flat_rows_index([p.to(device) for p in positions], input_ids.shape[1]) if hidden_layers else None
    hidden = {layer: out.hidden_states[layer].flatten(0, 1)[hidden_rows] for layer in hidden_layers}
    padded = {}
    if attention_layers:
        # [B, T_max] indices into the kept rows (padding rows repeat row 0 and are masked by the loss).
        index = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        batch_index = torch.arange(len(rows), device=device)[:, None]
        padded = {layer: store[layer][batch_index, index] for layer in attention_layers}
    return StudentOutputs(logits=logits, hidden=hidden, attention_padded=padded,
                          num_tokens=[len(r) for r in rows], lengths=list(lengths))


def _flat_rows_index(rows: list[Tensor], width: int) -> Tensor:
    """Indices into ``x.flatten(0, 1)`` of rows ``rows[b]`` of each sample ``b`` of an ``[B, width, ...]`` ``x``."""
    return torch.cat([r + b * width for b, r in enumerate(rows)])


def _flat_rows(x: Tensor, rows: list[Tensor]) -> Tensor:
    """``cat([x[b, rows[b]] for b])`` in one gather (one autograd node instead of one per sample)."""
    return x.flatten(0, 1)[_flat_rows_index(rows, x.shape[1])]
