"""What the demo runs: the teacher roles and their signals, the student variants, and the sizes
of each mode (quick, full). Data only, shared by the demo run and its report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# One teacher role per Drive-KD capability, each with the signals Drive-KD distils for it
# (teacher: 4 decoder layers, so layer 2 is the penultimate one).
ROLE_SIGNALS: dict[str, dict[str, Any]] = {
    "perception": {"attention_layers": (0,), "attention_kind": "t2v"},
    "reasoning": {"attention_layers": (1, 2), "attention_kind": "full", "hidden_layers": (2,)},
    "planning": {"attention_layers": (2,), "attention_kind": "t2v"},
}
CAPABILITIES = ("perception", "reasoning", "planning")

# Student variants: loss weights on top of CE (1.0). "kd" uses every cached signal.
VARIANTS: dict[str, dict[str, Any]] = {
    "sft": {"label": "student SFT (CE only)", "kd": 0.0, "hidden": 0.0, "attention": 0.0},
    "logits": {"label": "student CE + logit KD", "kd": 1.0, "hidden": 0.0, "attention": 0.0},
    "hidden": {"label": "student CE + hidden", "kd": 0.0, "hidden": 1.0, "attention": 0.0},
    "attention": {"label": "student CE + attention", "kd": 0.0, "hidden": 0.0, "attention": 1.0},
    "kd": {"label": "student multi-teacher KD (all signals)", "kd": 1.0, "hidden": 1.0, "attention": 1.0},
}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes, steps and loss settings of one demo mode."""

    mode: str
    n_scenes: int  # synthesised; splits 80 / 5 / 15 % train / val / test
    teacher_scenes: int  # the first train scenes: the teacher's clean training set
    student_scenes: int  # the next train scenes (disjoint from the teacher's): the student's
    label_noise: float  # fraction of the student's answers replaced by a wrong one of the same question
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    student_steps: int
    student_batch: int
    student_lr: float
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    eval_every: int  # student validation accuracy every N steps (for the curves)
    val_samples: int  # validation records scored at each of those points
    temperature: float = 1.0  # T=2 (the probe's) made logit KD alone no better than SFT here; T=1 helped
    kd_weight: float = 1.0
    hidden_weight: float = 1.0
    attention_weight: float = 1000.0  # attention-map MSE is ~1e-4: see report.py's design notes
    top_k: int = 16
    splits: tuple[float, float, float] = (0.8, 0.05, 0.15)
    teacher_init_seed: int = 1
    data_seed: int = 0

    def variant_loss(self, name: str) -> dict[str, float]:
        v = VARIANTS[name]
        return {"ce": 1.0, "kd": self.kd_weight * v["kd"], "hidden": self.hidden_weight * v["hidden"],
                "attention": self.attention_weight * v["attention"], "temperature": self.temperature}


PLANS: dict[str, DemoPlan] = {
    "quick": DemoPlan(mode="quick", n_scenes=400, teacher_scenes=240, student_scenes=80, label_noise=0.1,
                      teacher_steps=200, teacher_batch=32, teacher_lr=1e-3,
                      student_steps=150, student_batch=16, student_lr=3e-3,
                      seeds=(0,), variants=("sft", "kd"), eval_every=50, val_samples=60),
    "full": DemoPlan(mode="full", n_scenes=2000, teacher_scenes=1200, student_scenes=300, label_noise=0.1,
                     teacher_steps=700, teacher_batch=32, teacher_lr=7e-4,
                     student_steps=600, student_batch=16, student_lr=3e-3,
                     seeds=(0, 1, 2), variants=("sft", "logits", "hidden", "attention", "kd"),
                     eval_every=100, val_samples=150),
}
