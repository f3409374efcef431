"""Teacher engines behind one interface: ``load_engine("hf" | "vllm", model_dir, ...)``.

``capture(batch, spec)`` returns one ``TeacherSignals`` per sample. vLLM is imported only by the
vLLM engine, and only when it is built; the factory imports an engine's module only when asked
for it, so importing this package costs no torch model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.pipeline.build.engines.base import SignalSpec, TeacherEngine
from kd.pipeline.common.model_files import engine_identity

__all__ = ["SignalSpec", "TeacherEngine", "engine_identity", "load_engine"]


def load_engine(name: str, model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32",
                trust_remote_code: bool = False, **kwargs: Any) -> TeacherEngine:
    """Build an engine by name: ``"hf"`` (transformers) or ``"vllm"``; extra kwargs go to the engine."""
    if name == "hf":
        from kd.pipeline.build.engines.hf_engine import HFEngine

        return HFEngine(model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    if name == "vllm":
        from kd.pipeline.build.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    raise ValueError(f"unknown engine {name!r}: expected 'hf' or 'vllm'")
