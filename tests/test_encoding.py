"""Record -> teacher-forced inputs: the layout rule, image placement, hashes, and rejection of bad records."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from fixtures_models import (llm_tokenizer, make_image, tiny_llm_dir, tiny_vlm_dir, vlm_processor,  # noqa: F401
                             vlm_samples)

from kd.pipeline.common.encoding import encode_record, encode_sample, end_of_turn_token, hash_ids


def _ids(proc, token):
    return proc.tokenizer.convert_tokens_to_ids(token)


def test_layout_prompt_then_answer_then_end_of_turn(vlm_processor, vlm_samples):
    eot = _ids(vlm_processor, "<end_of_utterance>")
    for s in vlm_samples:
        assert s.input_ids.dtype == np.int32 and s.answer_ids.dtype == np.int32
        assert np.array_equal(s.input_ids[s.answer_start:], s.answer_ids)
        assert s.answer_ids[-1] == eot
        assert np.array_equal(s.target_positions, np.arange(s.answer_start - 1, len(s.input_ids) - 1))
        assert s.image_token_mask.shape == s.input_ids.shape and s.image_token_mask.dtype == bool


def test_image_tokens_expanded_per_image(vlm_processor, vlm_samples):
    image_id = _ids(vlm_processor, "<image>")
    per_image = vlm_processor.image_seq_len
    for s in vlm_samples:
        n = len(s.images)
        assert s.image_token_mask.sum() == n * per_image
        assert np.array_equal(s.image_token_mask, s.input_ids == image_id)
        # vLLM gets one placeholder per image and expands it itself.
        assert s.vllm_prompt_ids.count(image_id) == n
        assert s.vllm_prompt_ids[-s.num_answer_tokens:] == s.answer_ids.tolist()
        if n:
            assert s.model_inputs["pixel_values"].shape[:2] == (1, n)
        else:
            assert s.model_inputs == {} and s.vllm_prompt_ids == s.input_ids.tolist()


def test_images_go_before_the_prompt_text_unless_placed_explicitly(vlm_processor, vlm_samples):
    tok = vlm_processor.tokenizer
    text = tok.decode(vlm_samples[0].vllm_prompt_ids)
    assert text.index("<image>") < text.index("What color")
    explicit = tok.decode(vlm_samples[3].vllm_prompt_ids)
    assert explicit.index("Front camera:") < explicit.index("<image>") < explicit.index("What should")
    assert explicit.index("You drive carefully.") < explicit.index("<|im_start|>user")


def test_answer_ids_do_not_depend_on_the_prompt(vlm_processor):
    a = encode_sample(vlm_processor, "Which lane?", "left lane", [make_image(3)])
    b = encode_sample(vlm_processor, "Where should the car go next, left or right?", "left lane", [])
    assert np.array_equal(a.answer_ids, b.answer_ids)
    assert a.answer_hash == b.answer_hash and a.input_hash != b.input_hash


def test_text_only_tokenizer(llm_tokenizer):
    s = encode_sample(llm_tokenizer, "Stop or go?", "go", [], sample_id="t")
    assert s.vllm_prompt_ids == s.input_ids.tolist() and not s.image_token_mask.any()
    assert llm_tokenizer.decode(s.input_ids) == "<|im_start|>user\nStop or go?<end_of_utterance>\n<|im_start|>assistant\ngo<end_of_utterance>"
    assert end_of_turn_token(llm_tokenizer) == "<end_of_utterance>"
    with pytest.raises(ValueError, match="processor"):
        encode_sample(llm_tokenizer, "Stop?", "go", [make_image(0)])


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer_rejected(vlm_processor, answer):
    with pytest.raises(ValueError, match="empty answer"):
        encode_sample(vlm_processor, "Stop or go?", answer, [], sample_id="e")


def test_placeholder_count_must_match_images(vlm_processor):
    with pytest.raises(ValueError, match="placeholders"):
        encode_sample(vlm_processor, "Left <image> right <image>", "car", [make_image(0)])


def test_hash_ids_is_sha256_of_int32_le():
    expected = hashlib.sha256(np.asarray([1, 2, 300], dtype="<i4").tobytes()).hexdigest()[:32]
    assert hash_ids([1, 2, 300]) == expected
    assert hash_ids(np.asarray([1, 2, 300], dtype=np.int64)) == expected
    assert len(expected) == 32 and hash_ids([1, 2]) != expected


def test_encode_record_resolves_images_relative_to_the_jsonl(tmp_path, vlm_processor):
    (tmp_path / "img").mkdir()
    make_image(5).save(tmp_path / "img" / "front.png")
    record = {"id": "r1", "images": ["img/front.png"], "prompt": "Any pedestrian?", "answer": "yes",
              "capability": "perception"}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    loaded = json.loads((tmp_path / "data.jsonl").read_text().splitlines()[0])
    s = encode_record(vlm_processor, loaded, base_dir=tmp_path)
    assert s.sample_id == "r1" and s.capability == "perception" and len(s.images) == 1
    with pytest.raises(ValueError, match="prompt"):
        encode_record(vlm_processor, {"id": "r2", "answer": "yes"})
