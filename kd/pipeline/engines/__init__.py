"""Teacher engines behind one interface: ``load_engine("hf" | "vllm", model_dir, ...)``.

``capture(batch, spec)`` returns one ``TeacherSignals`` per sample. vLLM is imported only by the
vLLM engine, and only when it is built.
"""

from kd.pipeline.engines.base import SignalSpec, TeacherEngine, engine_identity, load_engine

__all__ = ["SignalSpec", "TeacherEngine", "engine_identity", "load_engine"]
