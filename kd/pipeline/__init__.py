"""The stages of kd: teacher engines, cache build, losses, distillation, evaluation."""
