"""Per-family conformance: kd's captures of each VLM family against an independent reference.

The reference never goes through kd's encoding, batching or engines: the family's processor is
called on the whole teacher-forced text (prompt + answer + end of turn) with the sample's images,
and the model runs one sample at a time, unpadded, fp32, eager attention, ``output_attentions``.
kd's hf engine captures the same samples in mixed batches (different image sizes and counts,
prompt lengths, text-only samples); everything must agree to 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from family_archs import VLM_ARCHS
from fixtures_models import assert_same_topk, make_image

from kd.pipeline.common.encoding import encode_sample, end_of_turn_token
from kd.pipeline.build.engines import SignalSpec, load_engine
from kd.pipeline.demo.tiny_families import build_tiny
from kd.pipeline.demo.tiny_models import TinyPreset

TOL = 1e-5
TEACHER = TinyPreset(hidden_size=64, num_layers=3, num_heads=2, intermediate_size=128)
SPEC = SignalSpec(top_k=16, hidden_layers=(0, 2, 3), attention_layers=(0, 2), attention_kind="both")


def _samples_for(arch: str) -> list[tuple[str, object, str, list]]:
    """(id, prompt or messages, answer, images): image sizes and counts vary, one is text-only."""
    images = [make_image(0), make_image(1, 64, 64), make_image(2, 90, 120), make_image(3, 120, 72)]
    return [
        ("one-image", "What color is the traffic light?", "red", [images[0]]),
        ("two-images", "How many cars are in the left lane?", "two cars, one truck", [images[1], images[2]]),
        ("other-size", "Should the ego car stop or go?", "stop and wait", [images[3]]),
        ("messages", [{"role": "system", "content": "You drive carefully."},
                      {"role": "user", "content": "What should the ego car do?"}], "brake and keep lane", [images[2]]),
        ("text-only", "Is the road ahead clear?", "yes", []),
    ]


def _messages(prompt, n_images: int) -> list[dict]:
    """The chat turns as a user of the family writes them (image parts first in the user turn)."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if n_images:
        user = next(m for m in turns if m["role"] == "user")
        user["content"] = [{"type": "image"}] * n_images + [{"type": "text", "text": user["content"]}]
    return turns


@pytest.fixture(scope="module", params=VLM_ARCHS)
def family(request, tmp_path_factory):
    """A tiny teacher of the family, its processor and kd's encoding of the samples."""
    from transformers import AutoProcessor

    arch = request.param
    model_dir = build_tiny(arch, tmp_path_factory.mktemp(arch) / "teacher", preset=TEACHER, seed=3)
    processor = AutoProcessor.from_pretrained(model_dir)
    raw = _samples_for(arch)
    encoded = [encode_sample(processor, p, a, imgs, sample_id=sid) for sid, p, a, imgs in raw]
    return arch, model_dir, processor, raw, encoded


@pytest.fixture(scope="module")
def reference(family):
    """Independent single-sample eager forward per sample (see the module docstring)."""
    from transformers import AutoModelForImageTextToText

    arch, model_dir, processor, raw, encoded = family
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    eot = end_of_turn_token(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    out = {}
    with torch.no_grad():
        for (sid, prompt, answer, images), enc in zip(raw, encoded):
            text = processor.apply_chat_template(_messages(prompt, len(images)), add_generation_prompt=True,
                                                 tokenize=False)
            kwargs = {"images": [images]} if images else {}
            inputs = processor(text=[text + answer + eot], return_tensors="pt", add_special_tokens=False, **kwargs)
            ids = inputs["input_ids"][0].numpy()
            assert np.array_equal(ids, enc.input_ids), f"{arch}/{sid}: kd's ids differ from the processor's"
            inputs.pop("attention_mask", None)
            o = model(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
            pos = torch.from_numpy(enc.target_positions)
            out[sid] = {
                "logprobs": torch.log_softmax(o.logits[0].double(), -1)[pos],
                "hidden": {i: h[0, pos].numpy() for i, h in enumerate(o.hidden_states)},
                "attn": {i: a[0].float().mean(0)[pos].numpy() for i, a in enumerate(o.attentions)},
                "image_positions": np.flatnonzero(ids == image_id),
            }
    return out


@pytest.fixture(scope="module")
def hf_capture(family):
    arch, model_dir, _, _, encoded = family
    engine = load_engine("hf", model_dir, batch_size=8)
    try:
        yield {s.sample_id: sig for s, sig in zip(encoded, engine.capture(encoded, SPEC))}
    finally:
        engine.close()


def test_hf_topk_logprobs_and_tail_match_the_reference(family, reference, hf_capture):
    arch, *_ , encoded = family
    for s in encoded:
        sig, ref = hf_capture[s.sample_id], reference[s.sample_id]["logprobs"]
        vals, ids = torch.topk(ref, SPEC.top_k, dim=-1)
        np.testing.assert_allclose(sig.logprobs, vals.numpy(), atol=TOL, err_msg=f"{arch}/{s.sample_id}")
        assert_same_topk(sig.ids, sig.logprobs, ids.numpy(), vals.numpy(), TOL)
        outside = torch.ones_like(ref, dtype=torch.bool).scatter_(1, torch.from_numpy(sig.ids).long(), False)
        tail = torch.logsumexp(ref.masked_fill(~outside, -math.inf), -1).numpy()
        np.testing.assert_allclose(sig.tail_logmass, tail, atol=TOL, err_msg=f"{arch}/{s.sample_id} tail")


def test_hf_hidden_states_match_the_reference(family, reference, hf_capture):
    arch, *_, encoded = family
    for s in encoded:
        for layer in SPEC.hidden_layers:
            np.testing.assert_allclose(hf_capture[s.sample_id].hidden[layer], reference[s.sample_id]["hidden"][layer],
                                       atol=TOL, err_msg=f"{arch}/{s.sample_id} hidden[{layer}]")


def test_hf_attention_maps_match_output_attentions_at_the_image_tokens(family, reference, hf_capture):
    arch, *_, encoded = family
    for s in encoded:
        ref, sig = reference[s.sample_id], hf_capture[s.sample_id]
        # t2v keys are exactly the family's image-token positions, as the processor placed them.
        assert np.array_equal(np.flatnonzero(s.image_token_mask), ref["image_positions"])
        for layer in SPEC.attention_layers:
            np.testing.assert_allclose(sig.attention_full[layer], ref["attn"][layer], atol=TOL,
                                       err_msg=f"{arch}/{s.sample_id} attention[{layer}]")
            np.testing.assert_allclose(sig.attention_t2v[layer], ref["attn"][layer][:, ref["image_positions"]],
                                       atol=TOL, err_msg=f"{arch}/{s.sample_id} t2v[{layer}]")


def test_six_cameras_in_one_sample(family, reference):
    """nuScenes' six cameras in one prompt, one capture vs the independent forward."""
    from transformers import AutoModelForImageTextToText

    arch, model_dir, processor, _, _ = family
    cams = [make_image(10 + i, 60 + 4 * i, 90) for i in range(6)]
    enc = encode_sample(processor, "Describe the scene around the ego car.", "two cars ahead", cams, sample_id="six")
    sig = load_engine("hf", model_dir).capture([enc], SignalSpec(top_k=8))[0]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = processor.apply_chat_template(_messages("Describe the scene around the ego car.", 6),
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text + "two cars ahead" + end_of_turn_token(processor)], images=[cams],
                       return_tensors="pt", add_special_tokens=False)
    assert np.array_equal(inputs["input_ids"][0].numpy(), enc.input_ids)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0]
    ref = torch.log_softmax(logits.double(), -1)[torch.from_numpy(enc.target_positions)]
    np.testing.assert_allclose(sig.logprobs, torch.topk(ref, 8, dim=-1).values.numpy(), atol=TOL)


# ---------------------------------------------------------------- vLLM (CPU build), where it runs the family

# Families whose vLLM CPU path is tested here; the others and why: README "Model families".
VLLM_ARCHS = ("qwen2_5_vl", "qwen2_vl", "internvl", "idefics3", "smolvlm", "llava", "llava_onevision", "qwen3_vl")
VLLM_SPEC = SignalSpec(top_k=16, hidden_layers=(0, 2, 3))
# vLLM expands each of several images per prompt with anyres where transformers' LLaVA-OneVision
# uses the base grid: the token counts differ, and the engine refuses such samples by name.
VLLM_ONE_IMAGE_ONLY = ("llava_onevision",)


@pytest.mark.vllm
def test_vllm_topk_and_hidden_match_the_reference(family, reference):
    arch, model_dir, _, _, encoded = family
    if arch not in VLLM_ARCHS:
        pytest.skip(f"{arch}: vLLM's CPU build is not tested for this family (README, Model families)")
    pytest.importorskip("vllm")
    engine = load_engine("vllm", model_dir, dtype="float32", hidden_layers=VLLM_SPEC.hidden_layers,
                         max_images_per_prompt=6)
    try:
        if arch in VLLM_ONE_IMAGE_ONLY:
            several = [s for s in encoded if len(s.images) > 1]
            with pytest.raises(RuntimeError, match=f"sample '{several[0].sample_id}': vLLM expanded the prompt"):
                engine.capture(several[:1], VLLM_SPEC)
            encoded = [s for s in encoded if len(s.images) <= 1]
        captured = engine.capture(encoded, VLLM_SPEC)
    finally:
        engine.close()
    for s, sig in zip(encoded, captured):
        ref = reference[s.sample_id]
        vals, ids = torch.topk(ref["logprobs"], VLLM_SPEC.top_k, dim=-1)
        np.testing.assert_allclose(sig.logprobs, vals.numpy(), atol=TOL, err_msg=f"{arch}/{s.sample_id} vllm")
        assert_same_topk(sig.ids, sig.logprobs, ids.numpy(), vals.numpy(), TOL)
        for layer in VLLM_SPEC.hidden_layers:
            np.testing.assert_allclose(sig.hidden[layer], ref["hidden"][layer], atol=TOL,
                                       err_msg=f"{arch}/{s.sample_id} vllm hidden[{layer}]")


def test_generic_image_placeholders_become_the_familys_markup(family):
    """LLaVA / ShareGPT data writes ``<image>`` where an image goes, whatever the model family."""
    arch, _, processor, _, _ = family
    imgs = [make_image(0), make_image(1, 64, 64)]
    prompt = [{"role": "user", "content": "Front: <image> Back: <image>\nHow many cars?"}]
    enc = encode_sample(processor, prompt, "two cars", imgs, sample_id="placeholders")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Front: "}, {"type": "image"},
                                          {"type": "text", "text": " Back: "}, {"type": "image"},
                                          {"type": "text", "text": "\nHow many cars?"}]}]
    if processor.image_token == "<image>":  # the family's own token: the processor expands it in place
        text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    else:
        text = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text + "two cars" + end_of_turn_token(processor)], images=[imgs], return_tensors="np",
                    add_special_tokens=False)["input_ids"][0]
    assert np.array_equal(ids, enc.input_ids), arch
    assert int(enc.image_token_mask.sum()) > 0
    with pytest.raises(ValueError, match="placeholders but 1 images"):
        encode_sample(processor, prompt, "two cars", imgs[:1])
