"""Stage two: distil a student from cached teacher signals (``distill(config) -> RunResult``).

``config.py`` the typed run config, ``data.py`` the aligned loader, ``student.py`` the student
forward, ``objective.py`` the losses, ``train.py`` the recipe, ``checkpoint.py`` / ``rundir.py``
what a run writes.
"""

from .config import DistillConfig, LossConfig, TrainConfig, load_config
from .data import AlignmentError, DistillDataset, VocabMap, open_teachers
from .objective import DistillObjective, LossBreakdown, TeacherPlan, plan_teacher
from .train import RunResult, distill

__all__ = [
    "AlignmentError", "DistillConfig", "DistillDataset", "DistillObjective", "LossBreakdown", "LossConfig",
    "RunResult", "TeacherPlan", "TrainConfig", "VocabMap", "distill", "load_config", "open_teachers",
    "plan_teacher",
]
