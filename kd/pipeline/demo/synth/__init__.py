"""Procedurally generated top-down driving scenes with closed-set questions and rule-based answers.

A small, fully known task for the tiny teacher/student models: perception (what is there),
reasoning (several facts combined) and planning (the ego action by explicit rules). Answers are
one or two words, scored by ``exact_match``. ``python -m kd.pipeline.demo.synth OUT --n 1000``.
"""

from .questions import (
    ACTIONS,
    BY_CAPABILITY,
    CAPABILITIES,
    QUESTIONS,
    Question,
    answer,
    ego_action,
    exact_match,
    normalize_answer,
    sample_scene,
)
from .render import render
from .scene import Pedestrian, Scene, Vehicle
from .writer import scene_records, split_sizes, synthesize

__all__ = [
    "ACTIONS", "BY_CAPABILITY", "CAPABILITIES", "QUESTIONS", "Pedestrian", "Question", "Scene",
    "Vehicle", "answer", "ego_action", "exact_match", "normalize_answer", "render", "sample_scene",
    "scene_records", "split_sizes", "synthesize",
]
