"""Tiny random-weight models built locally, for the demo and the tests (no model hub here).

Every model is written in the standard transformers layout (``save_pretrained``: config, safetensors
weights, tokenizer, processor, chat template), so the same directory loads in transformers
(``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` with ``trust_remote_code=False``) and in
vLLM. The VLM is Idefics3 because it is the one architecture whose vLLM path runs on this CPU
without torchvision (see ``/work/shared/notes/vllm-on-cpu.md``). CPU attention in vLLM needs
``head_dim >= 32``, which every builder enforces.

The same arguments give the same bytes. Weights derive from ``seed``; the tokenizer from
``tokenizer_seed`` (default 0), so teachers and students of different weight seeds share one
tokenizer, as a model family does, and a student can prove its tokens match the cache.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

# A driving-flavoured word list: the synthetic data and the demo prompts use these words,
# so each becomes one or few BPE tokens.
DRIVING_WORDS = (
    "car truck bus bicycle motorcycle pedestrian cyclist dog traffic light sign cone barrier "
    "red green yellow white black blue left right ahead behind front back lane road street "
    "intersection crosswalk stop go brake accelerate keep change turn slow down speed up wait "
    "yield merge overtake park how many what which is are the a an there of in on at to and "
    "yes no none one two three four five six seven eight nine ten zero "
    "0 1 2 3 4 5 6 7 8 9 color colour count object objects vehicle vehicles should ego action "
    "safe unsafe because near far close distance moving parked question answer image scene "
    "camera view perception reasoning planning"
).split()

PAD, BOS, EOT = "<pad>", "<|im_start|>", "<end_of_utterance>"
IMAGE, FAKE_IMAGE, GLOBAL_IMAGE = "<image>", "<fake_token_around_image>", "<global-img>"
SPECIAL_TOKENS = (
    [PAD, BOS, EOT, FAKE_IMAGE, IMAGE, GLOBAL_IMAGE]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
)

# ChatML-like turns; content may be a string or a list of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of one tiny model (text tower; the VLM adds a vision tower of ``vision_hidden``)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vision_hidden: int = 64
    vision_layers: int = 2
    image_size: int = 64
    patch_size: int = 8


# Teacher: 4 layers x 128; student: 2 layers x 64. Both train in minutes on 2 CPU cores.
TEACHER = TinyPreset(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256)
STUDENT = TinyPreset(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
PRESETS: dict[str, TinyPreset] = {"teacher": TEACHER, "student": STUDENT}


def _corpus(seed: int, n_lines: int = 3000) -> list[str]:
    """Pseudo-sentences over the driving words (deterministic in ``seed``)."""
    rng = random.Random(seed)
    lines = [" ".join(DRIVING_WORDS)]
    for _ in range(n_lines):
        words = rng.choices(DRIVING_WORDS, k=rng.randint(3, 12))
        line = " ".join(words)  # half lowercase: answers start a turn without a leading space
        lines.append((line.capitalize() if rng.random() < 0.5 else line) + rng.choice(["?", ".", ""]))
    return lines


@functools.lru_cache(maxsize=16)
def _tokenizer_json(seed: int, vocab_size: int, special_tokens: tuple[str, ...] = tuple(SPECIAL_TOKENS)) -> str:
    """Train a byte-level BPE once per (seed, vocab_size, specials) in this process; return its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok.to_str()


def build_tokenizer(*, seed: int = 0, vocab_size: int = 1024):
    """A ``PreTrainedTokenizerFast`` with the special tokens Idefics3 needs and our chat template.

    ``vocab_size`` is an upper bound: the small corpus runs out of merges at 819 tokens (seed 0),
    enough for every driving word to be one token with or without a leading space.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(seed, vocab_size)),
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, BOS, EOT)],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _check_heads(hidden_size: int, num_heads: int, what: str) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"{what}: hidden_size {hidden_size} not divisible by num_heads {num_heads}")
    if hidden_size // num_heads < 32:
        raise ValueError(f"{what}: head_dim {hidden_size // num_heads} < 32 (vLLM CPU attention needs >= 32)")


def _text_config(tok, *, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                 max_position: int, init_std: float):
    from transformers import LlamaConfig

    _check_heads(hidden_size, num_heads, "text model")
    return LlamaConfig(
        vocab_size=_round_up(len(tok)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position,
        initializer_range=init_std,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _init_and_save(model_cls, config, seed: int, out: Path) -> None:
    """Instantiate with a fixed torch seed (without disturbing the caller's RNG) and save."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_llm(
    out_dir: str | Path,
    *,
    hidden_size: int = STUDENT.hidden_size,
    num_layers: int = STUDENT.num_layers,
    num_heads: int = STUDENT.num_heads,
    intermediate_size: int | None = None,
    max_position: int = 1024,
    init_std: float = 0.1,
    seed: int = 0,
    tokenizer_seed: int = 0,
    vocab_size: int = 1024,
) -> Path:
    """Build a text-only Llama with random weights into ``out_dir`` and return the path."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed=tokenizer_seed, vocab_size=vocab_size)
    config = _text_config(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          intermediate_size=intermediate_size or 2 * hidden_size,
                          max_position=max_position, init_std=init_std)
    config.architectures = ["LlamaForCausalLM"]
    _init_and_save(LlamaForCausalLM, config, seed, out)
    tok.save_pretrained(out)
    return out


def build_tiny_vlm(
    out_dir: str | Path,
    *,
    hidden_size: int = STUDENT.hidden_size,
    num_layers: int = STUDENT.num_layers,
    num_heads: int = STUDENT.num_heads,
    intermediate_size: int | None = None,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int | None = None,
    image_size: int = 64,
    patch_size: int = 8,
    scale_factor: int = 2,
    max_position: int = 1024,
    init_std: float = 0.1,
    seed: int = 0,
    tokenizer_seed: int = 0,
    vocab_size: int = 1024,
) -> Path:
    """Build an Idefics3 VLM with random weights into ``out_dir`` and return the path.

    Images are resized to ``image_size`` squares without tiling, so each image costs
    ``(image_size // patch_size) ** 2 // scale_factor ** 2`` ``<image>`` tokens (16 by default)
    plus three wrapper tokens.
    """
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                              Idefics3VisionConfig)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if image_size % patch_size or (image_size // patch_size) % scale_factor:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size*scale_factor")
    vision_heads = vision_heads or max(1, vision_hidden // 32)
    _check_heads(vision_hidden, vision_heads, "vision tower")
    tok = build_tokenizer(seed=tokenizer_seed, vocab_size=vocab_size)
    text = _text_config(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                        intermediate_size=intermediate_size or 2 * hidden_size,
                        max_position=max_position, init_std=init_std)
    vision = Idefics3VisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                  image_size=image_size, patch_size=patch_size, initializer_range=init_std)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            image_token_id=tok.convert_tokens_to_ids(IMAGE), scale_factor=scale_factor,
                            pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config.architectures = ["Idefics3ForConditionalGeneration"]
    _init_and_save(Idefics3ForConditionalGeneration, config, seed, out)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(image_processor, tok, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def build_preset(kind: str, preset: str | TinyPreset, out_dir: str | Path, *, seed: int = 0,
                 tokenizer_seed: int = 0) -> Path:
    """Build ``kind`` ("vlm" or "llm") at a named preset ("teacher", "student") or a ``TinyPreset``."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    common = dict(hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                  intermediate_size=p.intermediate_size, seed=seed, tokenizer_seed=tokenizer_seed)
    if kind == "llm":
        return build_tiny_llm(out_dir, **common)
    if kind == "vlm":
        return build_tiny_vlm(out_dir, vision_hidden=p.vision_hidden, vision_layers=p.vision_layers,
                              image_size=p.image_size, patch_size=p.patch_size, **common)
    raise ValueError(f"kind must be 'vlm' or 'llm', got {kind!r}")
