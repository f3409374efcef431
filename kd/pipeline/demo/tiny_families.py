"""Tiny random-weight models of each VLM family our users run, in the standard transformers layout.

``build_tiny(arch, out_dir)`` writes config, safetensors weights, a locally trained tokenizer with
the family's special tokens, the family's real processor class and a chat template shaped like the
real checkpoint's, so the same directory loads through ``AutoProcessor`` /
``AutoModelForImageTextToText`` (``trust_remote_code=False``) and vLLM exactly as a hub checkpoint
would. Sizes are tiny (hidden 64, 2 layers, head_dim 32, a vision tower of width 64), so the
conformance tests run each family on two CPU cores in seconds.

Families: see ``ARCHS``. Each builder is one function: config, model class, processor. What the
families share (tokenizer training, saving) lives in ``tiny_models``. Tokenizers come in groups that
share every base id at one ``tokenizer_seed`` (the Qwen group: Qwen2/2.5/3-VL, InternVL,
LLaVA-OneVision, text qwen2; the Idefics group: Idefics3, SmolVLM, text llama), as the real
checkpoints extend one base vocabulary.

Weights are saved as transformers 5 saves them, so LLaVA / LLaVA-OneVision / Gemma 3 keep a flat
``vision_tower.*`` that vLLM refuses: ``kd.pipeline.build.engines.weight_names.vllm_model_dir`` gives vLLM
a renamed copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.pipeline.demo.tiny_models import (SPECIAL_TOKENS, STUDENT, TinyPreset, _check_heads, _init_and_save, _round_up,
                                     _text_config, _tokenizer_json, build_tiny_llm, build_tiny_vlm)

# Qwen2 / Qwen2.5 / Qwen3-VL turns, shaped like the real chat_template.jinja (a default system turn,
# images as <|vision_start|><|image_pad|><|vision_end|> in the user turn's content order).
QWEN_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class FamilyTokens:
    """A family's special tokens: ``specials`` in id order (after training, ids 0..n-1), and the
    roles transformers reads from the tokenizer (``pad``/``bos``/``eos`` and ``extra`` named ones)."""

    specials: tuple[str, ...]
    pad: str
    eos: str
    bos: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    appended: tuple[str, ...] = ()


def family_tokenizer(tokens: FamilyTokens, chat_template: str, *, seed: int = 0, vocab_size: int = 1024) -> Any:
    """A locally trained byte-level BPE carrying ``tokens`` and ``chat_template``.

    ``tokens.specials`` are trained in (ids 0..n-1); ``tokens.appended`` are added after the trained
    vocabulary, in order, as real checkpoints extend their base tokenizer (InternVL's ``<img>`` after
    Qwen2's vocabulary, LLaVA's ``<image>`` after Llama's). Families that share ``specials`` and
    ``seed`` therefore share every base id, so a teacher of one and a student of another can be
    mapped token for token.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    named = {tokens.pad, tokens.eos, tokens.bos} | {t for _, t in tokens.extra}
    backend = Tokenizer.from_str(_tokenizer_json(seed, vocab_size, tokens.specials))
    if tokens.appended:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens.appended])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=tokens.pad, eos_token=tokens.eos, bos_token=tokens.bos,
        additional_special_tokens=[t for t in tokens.specials + tokens.appended if t not in named],
        extra_special_tokens=dict(tokens.extra) or None,
    )
    tok.chat_template = chat_template
    return tok


def _qwen_text(tok: Any, p: TinyPreset, config_cls: type, max_position: int, **extra: Any) -> Any:
    _check_heads(p.hidden_size, p.num_heads, "text model")
    head_dim = p.hidden_size // p.num_heads
    # M-RoPE splits head_dim / 2 rotary frequencies into (temporal, height, width) sections.
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return config_cls(vocab_size=_round_up(len(tok)), hidden_size=p.hidden_size,
                      intermediate_size=p.intermediate_size, num_hidden_layers=p.num_layers,
                      num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads,
                      max_position_embeddings=max_position, rms_norm_eps=1e-6, initializer_range=0.1,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


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


def _vision_heads(width: int) -> int:
    """Heads of 32 dims (vLLM's CPU attention needs head_dim >= 32), at least one."""
    heads = max(1, width // 32)
    _check_heads(width, heads, "vision tower")
    return heads


def _tiny_vision(p: TinyPreset, **extra: Any) -> dict[str, Any]:
    """CLIP / SigLIP / Idefics-style vision-tower sizes of ``p`` (their configs share these names)."""
    return dict(hidden_size=p.vision_hidden, intermediate_size=2 * p.vision_hidden,
                num_hidden_layers=p.vision_layers, num_attention_heads=_vision_heads(p.vision_hidden), **extra)


def _llama_text(tok: Any, p: TinyPreset, max_position: int) -> Any:
    return _text_config(tok, hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                        intermediate_size=p.intermediate_size, max_position=max_position, init_std=0.1)


def _qwen2_text(tok: Any, p: TinyPreset, max_position: int) -> Any:
    from transformers import Qwen2Config

    _check_heads(p.hidden_size, p.num_heads, "text model")
    return Qwen2Config(vocab_size=_round_up(len(tok)), hidden_size=p.hidden_size,
                       intermediate_size=p.intermediate_size, num_hidden_layers=p.num_layers,
                       num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads,
                       max_position_embeddings=max_position, rms_norm_eps=1e-6, initializer_range=0.1,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def _save_vlm(model_cls: type, config: Any, processor: Any, seed: int, out: Path) -> None:
    config.architectures = [model_cls.__name__]
    _init_and_save(model_cls, config, seed, out)
    processor.save_pretrained(out)


# --- Idefics3 / SmolVLM: one tokenizer (tiny_models'), so a text llama student shares its ids ----

# SmolVLM-Instruct's turns: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:".
SMOLVLM_TEMPLATE = (
    "<|im_start|>{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}"
    "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
    "{%- else -%}{%- if message['content'][0]['type'] == 'image' -%}{{ ':' }}{%- else -%}{{ ': ' }}{%- endif -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def _idefics3(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """kd's own demo VLM (``tiny_models.build_tiny_vlm``): fixed-size images, no splitting."""
    build_tiny_vlm(out, hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                   intermediate_size=p.intermediate_size, vision_hidden=p.vision_hidden,
                   vision_layers=p.vision_layers, image_size=p.image_size, patch_size=p.patch_size,
                   max_position=max_position, seed=seed, tokenizer_seed=tokenizer_seed)


def _smolvlm(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """SmolVLM with image splitting on: an image is cut into 64 px crops plus a global view, so
    images of different aspect ratios cost different token counts (16 per crop)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tokens = FamilyTokens(tuple(SPECIAL_TOKENS), pad="<pad>", eos="<end_of_utterance>", bos="<|im_start|>",
                          extra=(("fake_image_token", "<fake_token_around_image>"), ("image_token", "<image>"),
                                 ("end_of_utterance_token", "<end_of_utterance>"),
                                 ("global_image_token", "<global-img>")))
    tok = family_tokenizer(tokens, SMOLVLM_TEMPLATE, seed=tokenizer_seed)
    crop, patch, scale = 64, 8, 2
    vision = SmolVLMVisionConfig(**_tiny_vision(p, image_size=crop, patch_size=patch, initializer_range=0.1))
    config = SmolVLMConfig(vision_config=vision.to_dict(), text_config=_llama_text(tok, p, max_position).to_dict(),
                           image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    sizes = dict(size={"longest_edge": 2 * crop}, max_image_size={"longest_edge": crop})
    processor = SmolVLMProcessor(SmolVLMImageProcessor(do_image_splitting=True, **sizes), tok,
                                 SmolVLMVideoProcessor(**sizes), image_seq_len=(crop // patch) ** 2 // scale**2,
                                 chat_template=SMOLVLM_TEMPLATE)
    _save_vlm(SmolVLMForConditionalGeneration, config, processor, seed, out)


# --- Qwen2 base vocabulary: InternVL, LLaVA-OneVision, Qwen3-VL and the qwen2 text student ------

# InternVL3-hf's turns (a default system turn; the real one is a long Chinese sentence, shortened
# here to keep tiny prompts short), each image as <IMG_CONTEXT> on its own line.
INTERNVL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are InternVL, a multimodal assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# InternVL3 appends these after Qwen2.5's vocabulary (151665..), so the base ids stay Qwen's.
INTERNVL_APPENDED = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                     "<box>", "</box>", "<video>")


def _internvl(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """InternVL3 in the HF layout (InternViT + Qwen2): images tiled by ``crop_to_patches`` into
    64 px tiles plus a thumbnail, 16 tokens per tile, so the aspect ratio sets the tile count."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    tokens = FamilyTokens(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>", appended=INTERNVL_APPENDED,
                          extra=(("start_image_token", "<img>"), ("end_image_token", "</img>"),
                                 ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>")))
    tok = family_tokenizer(tokens, INTERNVL_TEMPLATE, seed=tokenizer_seed)
    tile, patch = 64, 8
    seq = (tile // patch) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    vision = InternVLVisionConfig(**_tiny_vision(p, image_size=[tile, tile], patch_size=[patch, patch],
                                                 initializer_range=0.1))
    config = InternVLConfig(vision_config=vision.to_dict(), text_config=_qwen2_text(tok, p, max_position).to_dict(),
                            image_token_id=tok.context_image_token_id, image_seq_length=seq,
                            downsample_ratio=0.5, tie_word_embeddings=False)
    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    size = {"height": tile, "width": tile}
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=6,
                                            **imagenet)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok,
                                  video_processor=InternVLVideoProcessor(size=size, **imagenet),
                                  image_seq_length=seq, chat_template=INTERNVL_TEMPLATE)
    _save_vlm(InternVLForConditionalGeneration, config, processor, seed, out)


# llava-onevision-qwen2-*-ov-hf's turns: images first in a turn, then "\n" + text.
LLAVA_ONEVISION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{%- if message['content'] is string -%}{{ '\\n' + message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'video') -%}{{ '<video>' }}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{ '\\n' + part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# 32 px SigLIP crops; any grid up to 3 x 3 crops (the real one: 384 px, up to 6 x 6).
ONEVISION_PINPOINTS = [[32 * i, 32 * j] for i in range(1, 4) for j in range(1, 4)]


def _llava_onevision(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """LLaVA-OneVision (SigLIP + Qwen2) with anyres: a base view plus a grid of 32 px crops chosen
    from ``ONEVISION_PINPOINTS`` by the image's size, 16 tokens per crop before unpadding."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_llava_onevision import LlavaOnevisionImageProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    tokens = FamilyTokens(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>", appended=("<image>", "<video>"),
                          extra=(("image_token", "<image>"), ("video_token", "<video>")))
    tok = family_tokenizer(tokens, LLAVA_ONEVISION_TEMPLATE, seed=tokenizer_seed)
    crop, patch = 32, 8
    vision = SiglipVisionConfig(**_tiny_vision(p, image_size=crop, patch_size=patch, vision_use_head=False))
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(),
                                  text_config=_qwen2_text(tok, p, max_position).to_dict(),
                                  image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9",
                                  tie_word_embeddings=False)
    size = {"height": crop, "width": crop}
    siglip = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=ONEVISION_PINPOINTS, **siglip),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size, **siglip),
        num_image_tokens=(crop // patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=LLAVA_ONEVISION_TEMPLATE)
    _save_vlm(LlavaOnevisionForConditionalGeneration, config, processor, seed, out)


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


# --- LLaVA-1.5 (CLIP + Llama) and Gemma 3: their own base vocabularies ----------------------------

# llava-1.5-*-hf's turns: "USER: <image>\ntext ASSISTANT:".
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{ part['text'] + ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _llava(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """LLaVA-1.5: CLIP tower (32 px, 8 px patches, features of the second-last layer without CLS:
    16 tokens per image) and a Llama; Llama's <unk>/<s>/</s> first, <image>/<pad> appended."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    tokens = FamilyTokens(("<unk>", "<s>", "</s>"), pad="<pad>", eos="</s>", bos="<s>",
                          appended=("<image>", "<pad>"), extra=(("image_token", "<image>"),))
    tok = family_tokenizer(tokens, LLAVA_TEMPLATE, seed=tokenizer_seed)
    crop, patch = 32, 8
    vision = CLIPVisionConfig(**_tiny_vision(p, image_size=crop, patch_size=patch, projection_dim=p.vision_hidden))
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=_llama_text(tok, p, max_position).to_dict(),
                         image_token_index=tok.image_token_id, image_seq_length=(crop // patch) ** 2,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    image_processor = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    _save_vlm(LlavaForConditionalGeneration, config, processor, seed, out)


# gemma-3-*-it's turns: <bos>, a system message folded into the first user turn, "model" for the
# assistant, each image as <start_of_image> (the processor expands it to the soft tokens).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
GEMMA3_NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
GEMMA3_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")


def _gemma3(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """Gemma 3: SigLIP (64 px, 8 px patches) average-pooled to 16 soft tokens per image (fixed, no
    pan-and-scan), one sliding-window and one global layer per pair as the real 5:1 pattern."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

    tokens = FamilyTokens(GEMMA3_SPECIALS, pad="<pad>", eos="<eos>", bos="<bos>",
                          appended=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
                          extra=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                                 ("image_token", "<image_soft_token>")))
    tok = family_tokenizer(tokens, GEMMA3_TEMPLATE, seed=tokenizer_seed)
    # Gemma's vocabulary holds runs of 1-4 newlines as single tokens; the processor wraps each image in
    # "\n\n" and vLLM's Gemma 3 code looks these tokens up by their text.
    tok.add_tokens(list(GEMMA3_NEWLINES))
    _check_heads(p.hidden_size, p.num_heads, "text model")
    head_dim = p.hidden_size // p.num_heads
    layer_types = ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(p.num_layers)]
    text = Gemma3TextConfig(vocab_size=_round_up(len(tok)), hidden_size=p.hidden_size,
                            intermediate_size=p.intermediate_size, num_hidden_layers=p.num_layers,
                            num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads, head_dim=head_dim,
                            query_pre_attn_scalar=head_dim, sliding_window=512, layer_types=layer_types,
                            max_position_embeddings=max_position, initializer_range=0.1,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id)
    image, patch, tokens_per_image = 64, 8, 16
    vision = SiglipVisionConfig(**_tiny_vision(p, image_size=image, patch_size=patch, vision_use_head=False))
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=tokens_per_image, boi_token_index=tok.boi_token_id,
                          eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id,
                          initializer_range=0.1)
    image_processor = Gemma3ImageProcessor(size={"height": image, "width": image}, image_mean=[0.5, 0.5, 0.5],
                                           image_std=[0.5, 0.5, 0.5], do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=tokens_per_image)
    _save_vlm(Gemma3ForConditionalGeneration, config, processor, seed, out)


# --- text-only students ----------------------------------------------------------------------------

# Qwen2.5's turns without images: a student's text equals a Qwen-VL teacher's minus its vision tokens.
QWEN_TEXT_TEMPLATE = QWEN_VL_TEMPLATE.replace(
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}", "{%- if part['type'] == 'text' -%}")


def _llama(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """kd's text Llama (``tiny_models.build_tiny_llm``): Idefics3's / SmolVLM's tokenizer and turns."""
    build_tiny_llm(out, hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                   intermediate_size=p.intermediate_size, max_position=max_position, seed=seed,
                   tokenizer_seed=tokenizer_seed)


def _qwen2(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """A Qwen2 text model with the Qwen-VL tokenizer (same ids), a student for Qwen-family teachers."""
    from transformers import Qwen2ForCausalLM

    tok = family_tokenizer(FamilyTokens(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>"), QWEN_TEXT_TEMPLATE,
                           seed=tokenizer_seed)
    config = _qwen2_text(tok, p, max_position)
    config.architectures = [Qwen2ForCausalLM.__name__]
    _init_and_save(Qwen2ForCausalLM, config, seed, out)
    tok.save_pretrained(out)


Builder = Callable[[Path, TinyPreset, int, int, int], None]


@dataclass(frozen=True)
class Arch:
    """One family: its builder, a one-line summary (``kd models tiny --arch list``), whether it is
    text-only, and its default ``max_position`` (kd's older Idefics3 / Llama builders use 1024, so
    ``--kind vlm|llm`` keeps its bytes)."""

    build: Builder
    summary: str
    text_only: bool = False
    max_position: int = 4096


ARCHS: dict[str, Arch] = {
    "idefics3": Arch(_idefics3, "Idefics3 (SigLIP-style tower + Llama), kd's demo VLM: 64 px images, 16 tokens each",
                     max_position=1024),
    "smolvlm": Arch(_smolvlm, "SmolVLM: 64 px crops + a global view, 16 tokens per crop (aspect ratio sets the count)"),
    "qwen2_vl": Arch(lambda out, p, s, ts, mp: _qwen_vl(out, p, s, ts, mp, v25=False),
                     "Qwen2-VL: dynamic grid, 28 px per token, M-RoPE"),
    "qwen2_5_vl": Arch(lambda out, p, s, ts, mp: _qwen_vl(out, p, s, ts, mp, v25=True),
                       "Qwen2.5-VL: dynamic grid, 28 px per token, window attention in the tower"),
    "qwen3_vl": Arch(_qwen3_vl, "Qwen3-VL: dynamic grid, 32 px per token, interleaved M-RoPE, DeepStack"),
    "internvl": Arch(_internvl, "InternVL3 (HF layout, Qwen2 text): 64 px tiles + thumbnail, 16 tokens per tile"),
    "llava": Arch(_llava, "LLaVA-1.5 (CLIP + Llama): 32 px images, 16 tokens each"),
    "llava_onevision": Arch(_llava_onevision, "LLaVA-OneVision (SigLIP + Qwen2): anyres grids of 32 px crops"),
    "gemma3": Arch(_gemma3, "Gemma 3 (SigLIP + Gemma3 text): 64 px images pooled to 16 soft tokens"),
    "llama": Arch(_llama, "text-only Llama student, Idefics3's / SmolVLM's tokenizer", text_only=True,
                  max_position=1024),
    "qwen2": Arch(_qwen2, "text-only Qwen2 student, the Qwen-VL tokenizer", text_only=True),
}
# ``kd models tiny --kind`` (before ``--arch`` existed) names these.
KIND_ALIASES = {"vlm": "idefics3", "llm": "llama"}


def build_tiny(arch: str, out_dir: str | Path, *, preset: TinyPreset = STUDENT, seed: int = 0,
               tokenizer_seed: int = 0, max_position: int | None = None) -> Path:
    """Build a tiny random-weight model of family ``arch`` (a key of ``ARCHS``) into ``out_dir``.

    The same arguments give the same bytes: weights come from ``seed``, the tokenizer from
    ``tokenizer_seed``. ``max_position`` defaults to the family's (see ``Arch``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    family = ARCHS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family.build(out, preset, seed, tokenizer_seed, family.max_position if max_position is None else max_position)
    return out
