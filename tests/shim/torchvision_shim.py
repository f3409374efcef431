"""Test environment only: make PyPI's CUDA torchvision wheel importable on the CPU torch build.

PyPI's ``torchvision==0.28.0`` (the build that pairs with torch 2.13) is compiled for CUDA; on the
CPU torch its C++ ops do not load, and its Python import fails on registering fake kernels for
``torchvision::nms`` / ``qnms``, which then do not exist. Defining those two op schemas first is
enough for what transformers' Qwen2-VL / InternVL / SmolVLM processors and vLLM's model code use
(image transforms, no detection ops). GPU servers install the real torchvision; the product never
loads this file: ``tests/conftest.py`` puts this folder (and the test-only torchvision, installed by
``make test`` into ``.venv/test-extras``) on ``sys.path`` and ``PYTHONPATH`` for the tests alone.

The schemas are defined lazily, when something first imports torchvision, so a subprocess that
never touches images does not pay for importing torch here.
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def define_torchvision_schemas() -> None:
    """Define the op schemas torchvision's Python import registers fake kernels for (idempotent)."""
    import torch

    for name, schema in _SCHEMAS.items():
        ns, op = name.split("::")
        if not hasattr(getattr(torch.ops, ns), op):
            torch.library.define(name, schema)


class _DefineBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``define_torchvision_schemas`` the first time ``torchvision`` is imported, then steps aside."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_schemas()
        return None


if not any(isinstance(f, _DefineBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _DefineBeforeTorchvision())
