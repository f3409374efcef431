"""Tiny builders of the other families: Idefics3, SmolVLM, InternVL (HF format), LLaVA,
LLaVA-OneVision, Gemma 3 and the text Llama student."""

from __future__ import annotations

from pathlib import Path

from kd.pipeline.demo.tiny_models import (SPECIAL_TOKENS, TinyPreset, _check_heads, _round_up, build_tiny_llm,
                                          build_tiny_vlm)
from kd.pipeline.demo.tiny_parts import (FamilyTokens, QWEN_SPECIALS, _llama_text, _qwen2_text, _save_vlm,
                                         _tiny_vision, family_tokenizer)


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


def _llama(out: Path, p: TinyPreset, seed: int, tokenizer_seed: int, max_position: int) -> None:
    """kd's text Llama (``tiny_models.build_tiny_llm``): Idefics3's / SmolVLM's tokenizer and turns."""
    build_tiny_llm(out, hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                   intermediate_size=p.intermediate_size, max_position=max_position, seed=seed,
                   tokenizer_seed=tokenizer_seed)
