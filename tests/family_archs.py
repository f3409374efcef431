"""The families the conformance tests run: every arch ``kd models tiny`` builds."""

from kd.pipeline.demo.tiny_families import ARCHS

VLM_ARCHS = [name for name, arch in ARCHS.items() if not arch.text_only]
TEXT_ARCHS = [name for name, arch in ARCHS.items() if arch.text_only]
