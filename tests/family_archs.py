"""The families the conformance tests run: every VLM arch ``kd models tiny`` builds."""

from kd.pipeline.tiny_families import ARCHS

TEXT_ARCHS = ("llama", "qwen2")
VLM_ARCHS = [a for a in ARCHS if a not in TEXT_ARCHS]
