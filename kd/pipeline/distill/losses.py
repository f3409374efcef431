"""Distillation losses, one shape convention for every training loop: the logit terms (top-k and
sampled KD, CE; see ``logit_losses`` for the temperature and tail rules) and the feature terms
(hidden states, attention maps, layer maps: ``feature_losses``), under one import path."""

from kd.pipeline.distill.feature_losses import (HiddenProjector, attention_map_loss, default_attention_layers,
                                                group_mean_maps, group_teacher_layers, hidden_state_loss, layer_map,
                                                padded_attention_map_loss, segment_attention_map_loss,
                                                stacked_hidden_state_rows)
from kd.pipeline.distill.logit_losses import answer_ce_loss, sampled_kd_loss, student_log_probs, topk_kd_loss

__all__ = [
    "HiddenProjector",
    "answer_ce_loss",
    "attention_map_loss",
    "default_attention_layers",
    "group_mean_maps",
    "group_teacher_layers",
    "hidden_state_loss",
    "layer_map",
    "padded_attention_map_loss",
    "sampled_kd_loss",
    "segment_attention_map_loss",
    "stacked_hidden_state_rows",
    "student_log_probs",
    "topk_kd_loss",
]
