"""bench/capture.py's inputs: the tiny Llama teacher of a chosen vocabulary and width, and the
stage-one JSONL of long prompts with multi-token answers (or the synthetic driving data of the
VLM preset)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from kd.pipeline.demo.tiny_models import DRIVING_WORDS, TEACHER, build_tokenizer

# --shape: (sequence tokens, answer tokens min, max) for --model llm.
SHAPES = {"toy": (256, 10, 26), "real": (1600, 20, 40)}



def write_llm_data(path: Path, n: int, seq_tokens: int, seed: int,
                   answer_tokens: tuple[int, int] = SHAPES["toy"][1:]) -> Path:
    """Stage-one JSONL of ``n`` text-only records whose encoded sequences are ~``seq_tokens`` long.

    Every driving word is a single BPE token (with its leading space), the answer adds ~2 tokens
    ("." and the end-of-turn token) and the chat template ~6 around the prompt, so the word counts
    below set the token counts: answers of ``answer_tokens`` (min, max) tokens.
    """
    rng = random.Random(seed)
    words = [w for w in DRIVING_WORDS if w.isalpha()]
    lines = []
    for i in range(n):
        answer_words = rng.randint(answer_tokens[0] - 2, answer_tokens[1] - 2)
        prompt_words = max(8, seq_tokens - 8 - answer_words + rng.randint(-16, 16))
        prompt = " ".join(rng.choices(words, k=prompt_words)) + "?"
        answer = " ".join(rng.choices(words, k=answer_words)) + "."
        lines.append(json.dumps({"id": f"s{i:06d}", "images": [], "prompt": prompt, "answer": answer,
                                 "capability": rng.choice(["perception", "reasoning", "planning"])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_vlm_data(root: Path, n: int, seed: int) -> Path:
    """The first ``n`` records of the synthetic driving data (images relative to ``root``)."""
    from kd.pipeline.demo.synth import synthesize

    scenes = max(1, math.ceil(n / 3))  # 3 records per scene; all splits are pooled below
    paths = synthesize(root, scenes, seed=seed)
    lines = []
    for split in ("train", "val", "test"):
        if split in paths:
            lines += [ln for ln in paths[split].read_text().splitlines() if ln.strip()]
    out = root / "bench.jsonl"
    out.write_text("\n".join(lines[:n]) + "\n")
    return out


def head_jsonl(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


def build_llm_teacher(out: Path, vocab: int, max_position: int, seed: int,
                      hidden_size: int = TEACHER.hidden_size) -> Path:
    """The teacher preset's Llama (4 layers; 128 wide unless ``hidden_size``, head_dim 32) with an LM head
    of ``vocab`` ids (0: the tokenizer's size, rounded up to 64) and ``max_position`` positions; the
    tokenizer is the tiny models' (~1k ids used)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    heads = hidden_size // 32  # vLLM's CPU attention needs head_dim >= 32
    config = LlamaConfig(vocab_size=vocab or (len(tok) + 63) // 64 * 64, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=TEACHER.num_layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_position, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

