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

from dataclasses import dataclass
from pathlib import Path

from kd.pipeline.demo.tiny_models import STUDENT, TinyPreset
from kd.pipeline.demo.tiny_parts import Builder
from kd.pipeline.demo.tiny_qwen import _qwen2, _qwen3_vl, _qwen_vl
from kd.pipeline.demo.tiny_vlms import _gemma3, _idefics3, _internvl, _llama, _llava, _llava_onevision, _smolvlm


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
