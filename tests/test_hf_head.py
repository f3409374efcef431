"""The hf engine's two logit paths: the plain head on each sample's own rows, and the model's forward
at the union of answer positions (kept for heads that scale or soft-cap logits): same values."""

from __future__ import annotations

import numpy as np
from fixtures_models import tiny_llm_dir, tiny_vlm_dir, vlm_samples, vlm_processor  # noqa: F401

from kd.pipeline.build.engines import SignalSpec, load_engine
from kd.pipeline.build.engines.hf_engine import plain_lm_head


def test_both_paths_give_the_same_signals(tiny_vlm_dir, vlm_samples):
    spec = SignalSpec(top_k=16, hidden_layers=(1, 2), attention_layers=(0,), attention_kind="both")
    engine = load_engine("hf", tiny_vlm_dir)
    assert engine._head is not None  # Idefics3's head is a plain linear layer
    fast = engine.capture(vlm_samples, spec)
    engine._head = None  # the model's own forward, logits at the union of answer positions
    slow = engine.capture(vlm_samples, spec)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, atol=1e-5)
        for layer in (1, 2):
            np.testing.assert_allclose(a.hidden[layer], b.hidden[layer], atol=1e-6)
        np.testing.assert_allclose(a.attention_full[0], b.attention_full[0], atol=1e-6)


def test_a_head_that_changes_logits_keeps_the_models_forward(tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    assert plain_lm_head(model) is model.lm_head
    for name, value in (("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("logits_scaling", 8.0)):
        setattr(model.config, name, value)
        assert plain_lm_head(model) is None, name
        delattr(model.config, name)
    assert plain_lm_head(model) is model.lm_head
