"""Questions about a scene in three capabilities, with ground truth computed by explicit rules.

Every answer is one or two words from a small closed set (``QUESTIONS[name].answers``), so
accuracy is exact match after ``normalize_answer``. The prompt lists the options, so a general
VLM teacher can answer in the same closed set.

Rules (the single source of truth, tested on hand-built scenes):

* blocked: a vehicle in the ego lane, ``near`` row.
* a lane change to side L is safe iff lane L exists and its ``near``, ``beside`` and ``behind``
  cells are empty (a ``far`` vehicle leaves room).
* main hazard: crossing pedestrian > red/yellow light > blocking vehicle > none.
* ego action: crossing pedestrian or red light -> stop; yellow -> slow down; blocked -> change
  left if safe, else change right if safe, else slow down; otherwise keep lane.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kd.pipeline.distill.scoring import exact_match, normalize_answer  # noqa: F401 - re-exported

from .scene import COLOURS, LIGHTS, MAX_VEHICLES, Scene, sample_raw_scene

ACTIONS = ("stop", "slow down", "change left", "change right", "keep lane")
HAZARDS = ("pedestrian", "traffic light", "vehicle ahead", "none")
YES_NO = ("yes", "no")


def crossing_pedestrian(s: Scene) -> bool:
    return any(p.crossing for p in s.pedestrians)


def vehicle_ahead(s: Scene):
    """The nearest vehicle ahead in the ego lane (``near`` before ``far``), or None."""
    return s.vehicle_at(s.ego_lane, "near") or s.vehicle_at(s.ego_lane, "far")


def blocked(s: Scene) -> bool:
    return s.vehicle_at(s.ego_lane, "near") is not None


def lane_change_safe(s: Scene, side: int) -> bool:
    """``side`` -1 = left, +1 = right."""
    lane = s.ego_lane + side
    if not 0 <= lane < s.n_lanes:
        return False
    return all(s.vehicle_at(lane, row) is None for row in ("near", "beside", "behind"))


def main_hazard(s: Scene) -> str:
    if crossing_pedestrian(s):
        return "pedestrian"
    if s.light in ("red", "yellow"):
        return "traffic light"
    if blocked(s):
        return "vehicle ahead"
    return "none"


def ego_action(s: Scene) -> str:
    if crossing_pedestrian(s) or s.light == "red":
        return "stop"
    if s.light == "yellow":
        return "slow down"
    if blocked(s):
        if lane_change_safe(s, -1):
            return "change left"
        if lane_change_safe(s, +1):
            return "change right"
        return "slow down"
    return "keep lane"


def ego_lane_name(s: Scene) -> str:
    if s.ego_lane == 0:
        return "left"
    return "right" if s.ego_lane == s.n_lanes - 1 else "middle"


@dataclass(frozen=True)
class Question:
    """One question type: its capability, text, closed answer set and ground-truth function."""

    name: str
    capability: str
    text: str
    answers: tuple[str, ...]
    truth: Callable[[Scene], str]

    def prompt(self) -> str:
        return f"{self.text} Answer with one of: {', '.join(self.answers)}."


def _yn(b: bool) -> str:
    return "yes" if b else "no"


_ALL = (
    Question("vehicle_count", "perception", "How many other vehicles are on the road?",
             tuple(str(i) for i in range(MAX_VEHICLES + 1)), lambda s: str(len(s.vehicles))),
    Question("light_colour", "perception", "What colour is the traffic light?",
             LIGHTS[1:] + ("none",), lambda s: s.light),
    Question("ahead_colour", "perception", "What colour is the vehicle ahead in the ego lane?",
             COLOURS + ("none",), lambda s: v.colour if (v := vehicle_ahead(s)) else "none"),
    Question("pedestrian_present", "perception", "Is there a pedestrian?",
             YES_NO, lambda s: _yn(bool(s.pedestrians))),
    Question("ego_lane", "perception", "Which lane is the ego car in?",
             ("left", "middle", "right"), ego_lane_name),
    Question("left_safe", "reasoning", "Is it safe for the ego car to change to the left lane?",
             YES_NO, lambda s: _yn(lane_change_safe(s, -1))),
    Question("right_safe", "reasoning", "Is it safe for the ego car to change to the right lane?",
             YES_NO, lambda s: _yn(lane_change_safe(s, +1))),
    Question("main_hazard", "reasoning", "Which object matters most for the ego car right now?",
             HAZARDS, main_hazard),
    Question("ego_action", "planning", "What should the ego car do next?", ACTIONS, ego_action),
)
QUESTIONS: dict[str, Question] = {q.name: q for q in _ALL}
CAPABILITIES = ("perception", "reasoning", "planning")
BY_CAPABILITY: dict[str, tuple[Question, ...]] = {
    c: tuple(q for q in _ALL if q.capability == c) for c in CAPABILITIES
}


def answer(question: str, scene: Scene) -> str:
    """Ground truth of ``question`` (a name in ``QUESTIONS``) for ``scene``."""
    q = QUESTIONS[question]
    a = q.truth(scene)
    assert a in q.answers, (question, a)
    return a


def sample_scene(rng: np.random.Generator, action: str | None = None, max_tries: int = 10_000) -> Scene:
    """Draw a scene; with ``action``, redraw until the rule-based ego action equals it.

    Rejection keeps the scene distribution natural within each action while letting the caller
    balance the planning answers (the raw draws make some actions much rarer than others).
    """
    for _ in range(max_tries):
        scene = sample_raw_scene(rng)
        if action is None or ego_action(scene) == action:
            return scene
    raise RuntimeError(f"no scene with action {action!r} in {max_tries} draws")
