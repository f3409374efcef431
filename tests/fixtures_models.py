"""Session-scoped tiny models, images and samples shared by the tiny-model, encoding and engine tests.

Import the fixtures by name in a test module (``from fixtures_models import tiny_vlm_dir, ...``);
each model is built once per test session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kd.pipeline.common.encoding import EncodedSample, encode_sample
from kd.pipeline.demo.tiny_models import build_preset


def make_image(seed: int, height: int = 80, width: int = 100):
    """A deterministic random RGB image (non-square, so the processor's resizing is exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_same_topk(ids_a: np.ndarray, lp_a: np.ndarray, ids_b: np.ndarray, lp_b: np.ndarray, tol: float) -> None:
    """Top-k id sets agree row by row, except ids whose log-prob ties the k-th value within ``tol``."""
    for row in range(ids_a.shape[0]):
        a = dict(zip(ids_a[row].tolist(), lp_a[row].tolist()))
        b = dict(zip(ids_b[row].tolist(), lp_b[row].tolist()))
        cut = min(lp_a[row].min(), lp_b[row].min())
        diff = set(a) ^ set(b)
        near_cut = {i for i in diff if abs(a.get(i, b.get(i)) - cut) <= tol}
        assert diff == near_cut, f"row {row}: top-k sets differ by {sorted(diff - near_cut)}"


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    return build_preset("vlm", "student", tmp_path_factory.mktemp("models") / "vlm-student")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return build_preset("llm", "student", tmp_path_factory.mktemp("models") / "llm-student")


@pytest.fixture(scope="session")
def vlm_processor(tiny_vlm_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vlm_dir)


@pytest.fixture(scope="session")
def llm_tokenizer(tiny_llm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm_dir)


@pytest.fixture(scope="session")
def vlm_samples(vlm_processor) -> list[EncodedSample]:
    """Zero, one and two images; prompt and messages forms; an explicit ``<image>`` placeholder."""
    img = [make_image(0), make_image(1, 64, 64), make_image(2, 90, 120)]
    return [
        encode_sample(vlm_processor, "What color is the traffic light?", "red", [img[0]], sample_id="one-image"),
        encode_sample(vlm_processor, "How many cars are in the left lane?", "two cars, one truck",
                      [img[1], img[2]], sample_id="two-images"),
        encode_sample(vlm_processor, "Should the ego car stop or go?", "stop", [], sample_id="no-image"),
        encode_sample(vlm_processor, [{"role": "system", "content": "You drive carefully."},
                                      {"role": "user", "content": "Front camera: <image> What should the ego car do?"}],
                      "brake and keep lane", [img[2]], sample_id="messages"),
    ]
