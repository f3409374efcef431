"""The student: loading it, and a teacher-forced forward that returns what the losses need.

The forward mirrors the transformers teacher engine (``engines/hf_engine.py``) position for
position: right-padded batch, only the answer-predicting positions (``answer_start - 1 + j``) go
through the LM head, hidden states come from ``hidden_states[layer]`` (0 = embeddings, ``L`` =
final normed output) and attention maps are head-averaged softmax weights captured by a forward
hook on each decoder layer's ``self_attn`` (eager attention). Unlike the engine, everything keeps
its graph so the losses train the student.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.pipeline.engines.base import num_text_layers

__all__ = ["StudentOutputs", "load_student", "student_dims", "student_forward"]


@dataclass
class StudentOutputs:
    """Student outputs at the answer-predicting positions, rows in batch order (see ``data.collate``).

    ``logits``: ``[N, V]``; ``hidden``: layer -> ``[N, H]``; ``attention``: layer -> per-sample
    ``[T_b, S_b]`` head-averaged maps over that sample's own (unpadded) keys; ``attention_padded``:
    the same maps as one ``[B, T_max, S]`` tensor (row ``j`` of sample ``b`` predicts its answer token
    ``j``; ``S`` is the batch's padded width; rows ``>= T_b`` and keys ``>= S_b`` are padding), which
    lets the objective compute every sample's attention loss in a few batched ops.
    """

    logits: Tensor
    hidden: dict[int, Tensor] = field(default_factory=dict)
    attention: dict[int, list[Tensor]] = field(default_factory=dict)
    attention_padded: dict[int, Tensor] = field(default_factory=dict)


def load_student(model_dir: str | Path, *, attention: bool = False, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load the student model and its processor (a tokenizer for text-only models).

    ``attention=True`` selects eager attention, the only implementation that materialises the
    attention weights the attention-map loss needs.
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
                                      attn_implementation="eager" if attention else "sdpa")
    return model, processor


def student_dims(model: nn.Module) -> tuple[int, int]:
    """(decoder layers, hidden width) of the language model."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return num_text_layers(cfg), int(text.hidden_size)


def _positions(batch: dict[str, Any]) -> list[Tensor]:
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
        attention={layer: [m for p in parts for m in p.attention[layer]] for layer in attention_layers},
        attention_padded={layer: torch.cat([pad(p.attention_padded[layer]) for p in parts])
                          for layer in attention_layers},
    )


def _forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, extra: dict[str, Tensor],
             positions: list[Tensor], lengths: list[int], hidden_layers: list[int],
             attention_layers: list[int]) -> StudentOutputs:
    device = input_ids.device
    keep = torch.unique(torch.cat(positions)).to(device)  # sorted
    rows = [torch.searchsorted(keep, p.to(device)) for p in positions]
    store: dict[int, Tensor] = {}
    hooks = []
    if attention_layers:
        decoder_layers = model.get_decoder().layers

        def make(layer: int):
            def hook(_mod, _inp, output):
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError("attention weights were not returned: load the student with attention=True "
                                       "(eager attention)")
                store[layer] = weights.float().mean(dim=1)[:, keep, :]  # [B, |keep|, S]
            return hook

        hooks = [decoder_layers[i].self_attn.register_forward_hook(make(i)) for i in attention_layers]
    dtype = next(model.parameters()).dtype
    extra = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in extra.items()}
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(hidden_layers),
                    use_cache=False, logits_to_keep=keep, **extra)
    finally:
        for h in hooks:
            h.remove()
    logits = torch.cat([out.logits[b, r] for b, r in enumerate(rows)])
    hidden = {layer: torch.cat([out.hidden_states[layer][b, p.to(device)] for b, p in enumerate(positions)])
              for layer in hidden_layers}
    attention = {layer: [store[layer][b, r, : lengths[b]] for b, r in enumerate(rows)] for layer in attention_layers}
    padded = {}
    if attention_layers:
        # [B, T_max] indices into the kept rows (padding rows repeat row 0 and are masked by the loss).
        index = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        batch_index = torch.arange(len(rows), device=device)[:, None]
        padded = {layer: store[layer][batch_index, index] for layer in attention_layers}
    return StudentOutputs(logits=logits, hidden=hidden, attention=attention, attention_padded=padded)
