"""Test-wide environment: no hub access, quiet transformers, small vLLM CPU footprint."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# kd's own scratch (renamed vLLM checkpoints): one folder per test run, not the user's ~/.cache/kd.
os.environ.setdefault("KD_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="kd-test-cache-"))

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests

# Test environment only: PyPI's CUDA torchvision (installed by `make test` into .venv/test-extras,
# never into the product's site-packages) made importable on CPU torch by tests/shim/torchvision_shim.py.
# Qwen2-VL / Qwen2.5-VL / InternVL / SmolVLM processors and vLLM's code for them need torchvision.
# Subprocesses (the CLI tests) get the same through PYTHONPATH.
_SHIM = Path(__file__).parent / "shim"
_EXTRAS = Path(__file__).resolve().parents[1] / ".venv" / "test-extras"
_TEST_PATHS = [str(_SHIM)] + ([str(_EXTRAS)] if _EXTRAS.is_dir() else [])
for _p in reversed(_TEST_PATHS):
    sys.path.insert(0, _p)
os.environ["PYTHONPATH"] = os.pathsep.join(_TEST_PATHS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
import torchvision_shim  # noqa: E402,F401 - tests/shim; subprocesses load it through shim/sitecustomize.py

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _no_warm_engine_outlives_its_module():
    """Builds keep their engine warm in the process (``build.shard._WARM_ENGINES``). A vLLM engine one
    module leaves warm shares vLLM's process-global KV-transfer state with one the next module
    starts itself, whose hidden-states connector then finds no cache layer; so each module starts
    with none (test_build then test_family_conformance failed, run alone, without this)."""
    yield
    from kd.pipeline.build import close_warm_engines

    close_warm_engines()
