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


# --teacher: the llm teacher's shape. "tiny": the teacher preset's Llama (4 layers, MLP 2x the width,
# head_dim 32; --hidden-size sets the width): there the LM head costs 9-13x the whole body per token, so
# the answer rows' head caps (b)/(a) well below what real teachers see. "qwen2.5-0.5b": Qwen2.5-0.5B's
# exact width (896, 14 query / 2 KV heads, MLP 4,864, q/k/v bias, tied embeddings), the smallest
# member of the family InternVL3 and Qwen2.5-VL build on; --layers cuts its 24 layers to fit a CPU run.
# init_std: the tiny teacher's 0.1 gives peaked distributions at width 128; at width 896 it blows the
# residual stream up (rms ~75 after 4 layers) until fp32 rounding alone moves top-64 log-probs by ~1e-4
# (transformers' own fp32 forward vs fp64: 8e-5; vLLM vs transformers: 1.1e-4, past the self-check's
# float32 tolerance), so the wide teacher takes Qwen2.5's own initializer_range (0.02: 3e-6 vs fp64).
TEACHER_SHAPES = ("tiny", "qwen2.5-0.5b")


def teacher_dims(shape: str, hidden_size: int = TEACHER.hidden_size, layers: int = 0) -> dict:
    """(model_type, hidden, layers, MLP width, heads, KV heads, tied, init std) of a ``--teacher`` shape."""
    if shape == "qwen2.5-0.5b":
        return dict(model_type="qwen2", hidden_size=896, num_layers=layers or 24, intermediate_size=4864,
                    num_heads=14, kv_heads=2, tied=True, init_std=0.02)
    if shape != "tiny":
        raise ValueError(f"unknown teacher shape {shape!r} (one of {TEACHER_SHAPES})")
    heads = hidden_size // 32  # vLLM's CPU attention needs head_dim >= 32
    return dict(model_type="llama", hidden_size=hidden_size, num_layers=layers or TEACHER.num_layers,
                intermediate_size=2 * hidden_size, num_heads=heads, kv_heads=heads, tied=False, init_std=0.1)


def build_llm_teacher(out: Path, vocab: int, max_position: int, seed: int, dims: dict | None = None) -> Path:
    """A random-weight teacher of ``dims`` (``teacher_dims``; default the tiny Llama) with an LM head
    of ``vocab`` ids (0: the tokenizer's size, rounded up to 64) and ``max_position`` positions; the
    tokenizer is the tiny models' (~1k ids used)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    dims = dims or teacher_dims("tiny")
    tok = build_tokenizer()
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if dims["model_type"] == "qwen2" \
        else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(vocab_size=vocab or (len(tok) + 63) // 64 * 64, hidden_size=dims["hidden_size"],
                        intermediate_size=dims["intermediate_size"], num_hidden_layers=dims["num_layers"],
                        num_attention_heads=dims["num_heads"], num_key_value_heads=dims["kv_heads"],
                        max_position_embeddings=max_position, rms_norm_eps=1e-5, tie_word_embeddings=dims["tied"],
                        initializer_range=dims["init_std"], bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.architectures = [model_cls.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
