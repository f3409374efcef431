"""kd: offline teacher-output caching for multi-teacher knowledge distillation of VLMs."""

__version__ = "0.1.0"
