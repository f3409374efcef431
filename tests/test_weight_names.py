"""Weight names vLLM loads: transformers 5 saves CLIP / SigLIP towers flat, vLLM wants them nested.

The renamed copy must load in transformers to the very same state dict (so the hf engine, the
reference and vLLM read one model), carry every other file unchanged, and load in vLLM where the
checkpoint as saved is refused.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures_models import make_image

from kd.pipeline.build.engines.weight_names import (WeightNamesError, vllm_model_dir, vllm_weight_renames,
                                              write_vllm_checkpoint)
from kd.pipeline.demo.tiny_families import build_tiny

CLIP_RENAMES = {
    "vision_tower.embeddings.": "vision_tower.vision_model.embeddings.",
    "vision_tower.encoder.": "vision_tower.vision_model.encoder.",
    "vision_tower.post_layernorm.": "vision_tower.vision_model.post_layernorm.",
    "vision_tower.pre_layrnorm.": "vision_tower.vision_model.pre_layrnorm.",
}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny("llava", tmp_path_factory.mktemp("wn") / "llava")


def _keys(model_dir):
    from safetensors import safe_open

    keys = []
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys.extend(f.keys())
    return keys


def _state(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def test_flat_clip_tower_is_renamed_and_loads_the_same_in_transformers(llava, tmp_path):
    assert vllm_weight_renames(llava) == CLIP_RENAMES
    out = write_vllm_checkpoint(llava, tmp_path / "vllm")
    keys = _keys(out)
    assert keys and all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))
    assert len(keys) == len(_keys(llava))
    assert vllm_weight_renames(out) == {}
    before, after = _state(llava), _state(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (llava / name).read_bytes()


@pytest.mark.parametrize("arch", ["llava_onevision", "gemma3"])
def test_siglip_towers_are_renamed(arch, tmp_path):
    renames = vllm_weight_renames(build_tiny(arch, tmp_path / arch))
    assert renames and all(new == old.replace("vision_tower.", "vision_tower.vision_model.", 1)
                           for old, new in renames.items())


@pytest.mark.parametrize("arch", ["idefics3", "smolvlm", "internvl", "qwen2_5_vl", "qwen3_vl", "qwen2"])
def test_families_vllm_loads_as_saved_are_left_alone(arch, tmp_path):
    model_dir = build_tiny(arch, tmp_path / arch)
    assert vllm_weight_renames(model_dir) == {}
    assert vllm_model_dir(model_dir) == model_dir  # no scratch needed, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == [arch]


def test_without_scratch_the_error_says_what_to_do(llava):
    with pytest.raises(WeightNamesError) as err:
        vllm_model_dir(llava)
    msg = str(err.value)
    assert "vision_tower.embeddings.* -> vision_tower.vision_model.embeddings.*" in msg
    assert "write_vllm_checkpoint" in msg and str(llava) in msg


def test_the_renamed_copy_is_reused_until_the_model_changes(llava, tmp_path):
    first = vllm_model_dir(llava, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert vllm_model_dir(llava, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    os.utime(llava / "config.json", ns=(1, 1))  # a changed source gets a fresh copy
    assert vllm_model_dir(llava, tmp_path) != first


def test_sharded_checkpoints_rename_shards_and_index(llava, tmp_path):
    from transformers import AutoModelForImageTextToText

    sharded = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(llava).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (sharded / name).write_bytes((llava / name).read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert vllm_weight_renames(sharded) == CLIP_RENAMES
    out = write_vllm_checkpoint(sharded, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(_keys(out))
    assert not any(k.startswith("vision_tower.") and ".vision_model." not in k for k in index)
    before, after = _state(llava), _state(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_directory_without_safetensors_is_refused_by_name(llava, tmp_path):
    (tmp_path / "config.json").write_bytes((llava / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightNamesError, match="pytorch_model.bin.*safe_serialization=True"):
        vllm_weight_renames(tmp_path)


@pytest.mark.vllm
def test_vllm_refuses_the_saved_llava_and_loads_the_renamed_one(llava, tmp_path):
    """The renamed copy gives vLLM's prompt log-probs equal to transformers' on the original."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import LLM, SamplingParams

    kw = dict(enforce_eager=True, max_model_len=2048, dtype="float32", max_logprobs=1,
              limit_mm_per_prompt={"image": 6}, mm_processor_cache_gb=0)
    with pytest.raises(Exception, match="vision_tower.embeddings"):
        LLM(model=str(llava), **kw)
    processor = AutoProcessor.from_pretrained(llava)
    images = [make_image(0, 64, 64), make_image(1, 48, 96)]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "How many cars?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False) + " two cars"
    enc = processor(text=[text], images=[images], return_tensors="pt")
    with torch.no_grad():
        ref = torch.log_softmax(AutoModelForImageTextToText.from_pretrained(llava, dtype=torch.float32)(**enc)
                                .logits[0], -1)
    llm = LLM(model=str(vllm_model_dir(llava, tmp_path)), **kw)
    out = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}}],
                       SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False))[0]
    ids = enc["input_ids"][0].tolist()
    assert list(out.prompt_token_ids) == ids
    diff = max(abs(out.prompt_logprobs[i][ids[i]].logprob - ref[i - 1, ids[i]].item()) for i in range(1, len(ids)))
    assert diff < 1e-4
