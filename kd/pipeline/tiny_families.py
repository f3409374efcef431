"""Tiny random-weight models of each VLM family our users run, in the standard transformers layout.

``build_tiny(arch, out_dir)`` writes config, safetensors weights, a locally trained tokenizer with
the family's special tokens, the family's real processor class and a chat template shaped like the
real checkpoint's, so the same directory loads through ``AutoProcessor`` /
``AutoModelForImageTextToText`` (``trust_remote_code=False``) and vLLM exactly as a hub checkpoint
would. Sizes are tiny (hidden 64, 2 layers, head_dim 32, a vision tower of width 64), so the
conformance tests run each family on two CPU cores in seconds.

Families: see ``ARCHS``. Each builder is one function: config, model class, processor. What the
families share (tokenizer training, saving) lives in ``tiny_models``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.pipeline.tiny_models import STUDENT, TinyPreset, _check_heads, _init_and_save, _round_up, _tokenizer_json

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


def family_tokenizer(tokens: FamilyTokens, chat_template: str, *, seed: int = 0, vocab_size: int = 1024) -> Any:
    """A locally trained byte-level BPE carrying ``tokens`` and ``chat_template``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    named = {tokens.pad, tokens.eos, tokens.bos} | {t for _, t in tokens.extra}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(seed, vocab_size, tokens.specials)),
        pad_token=tokens.pad, eos_token=tokens.eos, bos_token=tokens.bos,
        additional_special_tokens=[t for t in tokens.specials if t not in named],
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


Builder = Callable[[Path, TinyPreset, int, int, int], None]

ARCHS: dict[str, Builder] = {
    "qwen2_vl": lambda out, p, s, ts, mp: _qwen_vl(out, p, s, ts, mp, v25=False),
    "qwen2_5_vl": lambda out, p, s, ts, mp: _qwen_vl(out, p, s, ts, mp, v25=True),
}


def build_tiny(arch: str, out_dir: str | Path, *, preset: TinyPreset = STUDENT, seed: int = 0,
               tokenizer_seed: int = 0, max_position: int = 4096) -> Path:
    """Build a tiny random-weight model of family ``arch`` (a key of ``ARCHS``) into ``out_dir``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(sorted(ARCHS))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ARCHS[arch](out, preset, seed, tokenizer_seed, max_position)
    return out
