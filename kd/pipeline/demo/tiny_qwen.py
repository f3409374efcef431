"""Tiny Qwen-family builders: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and the Qwen2 text student (one tokenizer group)."""

from __future__ import annotations

from pathlib import Path

from kd.pipeline.demo.tiny_models import TinyPreset, _check_heads, _init_and_save, _round_up
from kd.pipeline.demo.tiny_parts import (FamilyTokens, QWEN_SPECIALS, QWEN_VL_TEMPLATE, _qwen2_text, _qwen_text,
                                         _save_vlm, _vision_heads, family_tokenizer)


def _qwen_vl(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int, *, v25: bool) -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if v25:
        from transformers import (Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model,
                                  Qwen2_5_VLProcessor as Processor)
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (Qwen2_5_VLTextConfig as TextConfig,
                                                                             Qwen2_5_VLVisionConfig as VisionConfig)
    else:
        from transformers import (Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model,
                                  Qwen2VLProcessor as Processor)
        from transformers.models.qwen2_vl.configuration_qwen2_vl import (Qwen2VLTextConfig as TextConfig,
                                                                         Qwen2VLVisionConfig as VisionConfig)
    tokens = FamilyTokens(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>")
    tok = family_tokenizer(tokens, QWEN_VL_TEMPLATE, seed=tokenizer_seed)
    text = _qwen_text(tok, p, TextConfig, max_position)
    vision_heads = max(1, p.vision_hidden // 32)
    _check_heads(p.vision_hidden, vision_heads, "vision tower")
    vision = dict(depth=p.vision_layers, hidden_size=p.vision_hidden, num_heads=vision_heads, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    if v25:  # window attention over 4x4 merged patches, the last block global (as the 7B's layout)
        vision.update(intermediate_size=2 * p.vision_hidden, out_hidden_size=p.hidden_size, window_size=56,
                      fullatt_block_indexes=[p.vision_layers - 1])
    else:
        vision.update(embed_dim=p.vision_hidden, mlp_ratio=2, hidden_size=p.hidden_size)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Config(text_config=text.to_dict(), vision_config=VisionConfig(**vision).to_dict(),
                    tie_word_embeddings=False, **ids)
    config.architectures = [Model.__name__]
    _init_and_save(Model, config, seed, out)
    # Dynamic resolution: 28 px per merged token, from 2x2 to 8x8 merged tokens per image.
    pixels = dict(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = Processor(image_processor=Qwen2VLImageProcessor(**pixels),
                          tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**pixels),
                          chat_template=QWEN_VL_TEMPLATE)
    processor.save_pretrained(out)


# Qwen3-VL's turns: as Qwen2.5-VL's, without the default system turn.
QWEN3_VL_TEMPLATE = QWEN_VL_TEMPLATE.replace(
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}", "")


def _qwen3_vl(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """Qwen3-VL: 16 px patches merged 2 x 2 (32 px per token, 2 x 2 to 8 x 8 tokens per image),
    interleaved M-RoPE and DeepStack features from the first vision block."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = family_tokenizer(FamilyTokens(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>"), QWEN3_VL_TEMPLATE,
                           seed=tokenizer_seed)
    _check_heads(p.hidden_size, p.num_heads, "text model")
    head_dim = p.hidden_size // p.num_heads
    half = head_dim // 2  # the 8B's [24, 20, 20] of 64, scaled to half
    section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    text = Qwen3VLTextConfig(vocab_size=_round_up(len(tok)), hidden_size=p.hidden_size,
                             intermediate_size=p.intermediate_size, num_hidden_layers=p.num_layers,
                             num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads, head_dim=head_dim,
                             max_position_embeddings=max_position, rms_norm_eps=1e-6, initializer_range=0.1,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": section, "mrope_interleaved": True},
                             bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = Qwen3VLVisionConfig(depth=p.vision_layers, hidden_size=p.vision_hidden,
                                 intermediate_size=2 * p.vision_hidden, num_heads=_vision_heads(p.vision_hidden),
                                 patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                 out_hidden_size=p.hidden_size, num_position_embeddings=64,
                                 deepstack_visual_indexes=[0], initializer_range=0.1)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), tie_word_embeddings=False,
                           **ids)
    pixels = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
                  image_std=[0.5, 0.5, 0.5])
    size = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, **pixels), tokenizer=tok,
                                 video_processor=Qwen3VLVideoProcessor(size=size, **pixels),
                                 chat_template=QWEN3_VL_TEMPLATE)
    _save_vlm(Qwen3VLForConditionalGeneration, config, processor, seed, out)


# Qwen2.5's turns without images: a student's text equals a Qwen-VL teacher's minus its vision tokens.
QWEN_TEXT_TEMPLATE = QWEN_VL_TEMPLATE.replace(
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}", "{%- if part['type'] == 'text' -%}")


def _qwen2(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """A Qwen2 text model with the Qwen-VL tokenizer (same ids), a student for Qwen-family teachers."""
    from transformers import Qwen2ForCausalLM

    tok = family_tokenizer(FamilyTokens(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>"), QWEN_TEXT_TEMPLATE,
                           seed=tokenizer_seed)
    config = _qwen2_text(tok, p, max_position)
    config.architectures = [Qwen2ForCausalLM.__name__]
    _init_and_save(Qwen2ForCausalLM, config, seed, out)
    tok.save_pretrained(out)

