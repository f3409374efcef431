"""The tiny-model factory: standard layout, loadable by transformers, deterministic, vLLM-compatible sizes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from fixtures_models import tiny_llm_dir, tiny_vlm_dir  # noqa: F401  (fixtures)

from kd.pipeline.demo.tiny_models import (IMAGE, SPECIAL_TOKENS, STUDENT, TEACHER, TinyPreset, build_preset, build_tiny_llm,
                                     build_tiny_vlm, build_tokenizer)


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_vlm_has_standard_layout_and_loads_in_transformers(tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    names = {p.name for p in tiny_vlm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"} <= names
    proc = AutoProcessor.from_pretrained(tiny_vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    tok = proc.tokenizer
    assert model.config.text_config.vocab_size >= len(tok)
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE)
    assert proc.image_seq_len == 16
    assert proc.chat_template


def test_llm_loads_and_runs(tiny_llm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    ids = tok("keep lane", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert tok.chat_template and tok.eos_token == "<end_of_utterance>"


def test_same_arguments_same_bytes(tmp_path, tiny_llm_dir):
    again = build_preset("llm", "student", tmp_path / "again")
    assert _digests(again) == _digests(tiny_llm_dir)
    other = build_preset("llm", "student", tmp_path / "other", seed=1)
    assert _digests(other)["model.safetensors"] != _digests(tiny_llm_dir)["model.safetensors"]


def test_tokenizer_is_deterministic_and_has_idefics3_specials():
    a, b = build_tokenizer(seed=0), build_tokenizer(seed=0)
    assert a.get_vocab() == b.get_vocab()
    vocab = a.get_vocab()
    assert all(t in vocab for t in SPECIAL_TOKENS)
    assert len([t for t in vocab if t.startswith("<row_")]) == 36
    # Driving words used as answers are single tokens, with and without a leading space.
    for word in ("red", "green", "car", "truck", "stop", "brake", "yes", "no", "left", "pedestrian", "3"):
        assert len(a.tokenize(word)) == 1, word
        assert len(a.tokenize(" " + word)) == 1, word


def test_head_dim_below_32_rejected(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_llm(tmp_path / "x", hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_vlm(tmp_path / "y", vision_hidden=64, vision_heads=4)


def test_presets_are_small_and_teacher_is_larger():
    assert TEACHER.hidden_size > STUDENT.hidden_size and TEACHER.num_layers > STUDENT.num_layers
    for p in (TEACHER, STUDENT):
        assert isinstance(p, TinyPreset) and p.hidden_size // p.num_heads >= 32 and p.image_size <= 112
    with pytest.raises(ValueError, match="kind"):
        build_preset("audio", "student", "unused")
