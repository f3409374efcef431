"""What the tiny family builders share: the family's special tokens and a locally trained tokenizer
carrying them, the Qwen-VL template and specials, tiny vision towers and text configs, and saving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.pipeline.demo.tiny_models import (TinyPreset, _check_heads, _init_and_save, _round_up, _text_config,
                                          _tokenizer_json)
from collections.abc import Callable

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


# A family builder: (out dir, preset, weight seed, tokenizer seed, max_position) -> writes the model.
Builder = Callable[[Path, TinyPreset, int, int, int], None]
