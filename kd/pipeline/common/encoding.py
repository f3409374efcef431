"""One dataset record -> teacher-forced model inputs, the same for every teacher engine and the student.

Rule: full ids = tokens(chat-templated prompt up to the start of the assistant turn)
+ tokens(answer + end-of-turn). The answer is tokenized on its own, so its ids never depend on
the prompt, and teacher and student (sharing a tokenizer) see the same answer tokens.

Record format (JSONL, one per line)::

    {"id": str, "images": [paths relative to the JSONL], "prompt": str  (or "messages": [{"role", "content"}...]),
     "answer": str, "capability": str}

Images go before the prompt text in the (first) user turn, one placeholder per image, unless the
text already carries explicit ``<image>`` placeholders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd.cache_schema.writer import hash_ids  # one definition: the cache's alignment proof
from kd.pipeline.common.model_inputs import extend_per_token

IMAGE_PLACEHOLDER = "<image>"
_END_OF_TURN_CANDIDATES = ("<end_of_utterance>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class EncodedSample:
    """Teacher-forced inputs of one sample.

    Attributes:
        sample_id: the record id.
        input_ids: ``[S]`` int32 full sequence (prompt with expanded image tokens, then answer).
        answer_start: index of the first answer token in ``input_ids``.
        answer_ids: ``[T]`` int32, ``input_ids[answer_start:]``.
        image_token_mask: ``[S]`` bool, True at image-token positions (the t2v attention keys).
        model_inputs: extra HF model inputs from the processor (``pixel_values``, ...), numpy, as the
            processor returns them for one sample; per-token ones (``mm_token_type_ids``, ...) cover
            all of ``input_ids`` (see ``model_inputs.extend_per_token``).
        images: the PIL images, in placeholder order.
        vllm_prompt_ids: what vLLM takes as prompt ids: the same sequence with each image still one
            unexpanded placeholder (vLLM expands it itself); equals ``input_ids`` for text-only samples.
        capability: the record's capability tag ("" when absent).
    """

    sample_id: str
    input_ids: np.ndarray
    answer_start: int
    answer_ids: np.ndarray
    image_token_mask: np.ndarray
    model_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)
    vllm_prompt_ids: list[int] = field(default_factory=list)
    capability: str = ""

    @property
    def num_answer_tokens(self) -> int:
        return int(self.answer_ids.shape[0])

    @property
    def target_positions(self) -> np.ndarray:
        """Positions whose outputs predict the answer tokens (``answer_start - 1 + j``)."""
        return np.arange(self.answer_start - 1, self.answer_start - 1 + self.num_answer_tokens)

    @property
    def input_hash(self) -> str:
        return hash_ids(self.input_ids)

    @property
    def answer_hash(self) -> str:
        return hash_ids(self.answer_ids)




def _tokenizer_of(proc: Any) -> Any:
    return getattr(proc, "tokenizer", proc)


def end_of_turn_token(proc: Any) -> str:
    """The token that closes an assistant turn: a known end-of-turn special if the vocab has one, else eos."""
    tok = _tokenizer_of(proc)
    cached = _END_OF_TURN.get(id(tok))
    if cached is not None and cached[0] is tok:  # get_vocab() rebuilds a dict: ~1 ms per call
        return cached[1]
    vocab = tok.get_vocab()
    for cand in _END_OF_TURN_CANDIDATES:
        if cand in vocab:
            break
    else:
        if tok.eos_token is None:
            raise ValueError("tokenizer has neither a known end-of-turn token nor an eos token")
        cand = tok.eos_token
    _END_OF_TURN[id(tok)] = (tok, cand)
    return cand


_END_OF_TURN: dict[int, tuple[Any, str]] = {}  # id(tokenizer) -> (tokenizer, token); the few tokenizers of a run


def _image_token(proc: Any) -> str:
    return getattr(proc, "image_token", None) or IMAGE_PLACEHOLDER


def build_messages(prompt_or_messages: str | Sequence[Mapping[str, Any]], num_images: int,
                   image_token: str = IMAGE_PLACEHOLDER) -> list[dict[str, Any]]:
    """Chat turns before the answer, with one image part per image placed before the user text.

    Explicit placeholders place the images instead: the processor's own image token is left in
    the text for the processor to expand; kd's generic ``<image>`` (LLaVA / ShareGPT data) with a
    processor whose token differs (Qwen-VL's ``<|image_pad|>``, InternVL's ``<IMG_CONTEXT>``)
    becomes an image part where it stands, so the family's chat template writes its own markup.
    """
    if isinstance(prompt_or_messages, str):
        messages = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = [dict(m) for m in prompt_or_messages]
    if not messages:
        raise ValueError("no prompt: empty messages")
    texts = [m["content"] for m in messages if isinstance(m.get("content"), str)]
    explicit = sum(t.count(image_token) for t in texts)
    if explicit:
        if explicit != num_images:
            raise ValueError(f"prompt has {explicit} {image_token} placeholders but {num_images} images")
        return messages
    generic = sum(t.count(IMAGE_PLACEHOLDER) for t in texts) if image_token != IMAGE_PLACEHOLDER else 0
    if generic:
        if generic != num_images:
            raise ValueError(f"prompt has {generic} {IMAGE_PLACEHOLDER} placeholders but {num_images} images")
        for m in messages:
            if isinstance(m.get("content"), str) and IMAGE_PLACEHOLDER in m["content"]:
                m["content"] = _image_parts(m["content"])
        return messages
    if num_images:
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None:
            raise ValueError("images given but no user turn to place them in")
        content = user["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        user["content"] = [{"type": "image"} for _ in range(num_images)] + parts
    return messages


def _image_parts(text: str) -> list[dict[str, str]]:
    """``"a <image> b"`` -> text / image / text content parts (empty texts dropped)."""
    parts: list[dict[str, str]] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def encode_sample(
    processor_or_tokenizer: Any,
    prompt_or_messages: str | Sequence[Mapping[str, Any]],
    answer: str,
    images: Sequence[Any] = (),
    *,
    sample_id: str = "",
    capability: str = "",
) -> EncodedSample:
    """Encode one sample for teacher forcing (see the module docstring for the rule)."""
    if not answer or not answer.strip():
        raise ValueError(f"sample {sample_id!r}: empty answer")
    proc = processor_or_tokenizer
    tok = _tokenizer_of(proc)
    images = list(images)
    image_token = _image_token(proc)
    messages = build_messages(prompt_or_messages, len(images), image_token)
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(text, list):
        text = text[0]
    # vLLM expands images itself: it takes the template's tokens with one placeholder per image.
    unexpanded = list(tok(text, add_special_tokens=False)["input_ids"])
    model_inputs: dict[str, np.ndarray] = {}
    if images:
        if tok is proc:
            raise ValueError(f"sample {sample_id!r}: images given but only a tokenizer (no processor)")
        enc = proc(text=[text], images=[images], return_tensors="np", add_special_tokens=False)
        prompt_ids = [int(i) for i in enc["input_ids"][0]]
        model_inputs = {k: np.asarray(v) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    else:
        prompt_ids = unexpanded
    answer_ids = list(tok(answer + end_of_turn_token(proc), add_special_tokens=False)["input_ids"])
    input_ids = np.asarray(prompt_ids + answer_ids, dtype=np.int32)
    model_inputs = extend_per_token(model_inputs, len(input_ids))  # the answer's tokens are text
    image_id = tok.convert_tokens_to_ids(image_token) if images else None
    mask = input_ids == image_id if image_id is not None else np.zeros(len(input_ids), dtype=bool)
    return EncodedSample(
        sample_id=sample_id,
        input_ids=input_ids,
        answer_start=len(prompt_ids),
        answer_ids=np.asarray(answer_ids, dtype=np.int32),
        image_token_mask=mask,
        model_inputs=model_inputs,
        images=images,
        vllm_prompt_ids=unexpanded + answer_ids,
        capability=capability,
    )


def load_images(paths: Sequence[str | Path], base_dir: str | Path | None = None) -> list[Any]:
    """Open images as RGB PIL images; relative paths resolve against ``base_dir`` (the JSONL's folder)."""
    from PIL import Image

    out = []
    for p in paths:
        path = Path(p)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def encode_record(processor_or_tokenizer: Any, record: Mapping[str, Any],
                  base_dir: str | Path | None = None) -> EncodedSample:
    """Encode one JSONL record (``prompt`` or ``messages``; image paths relative to ``base_dir``)."""
    sid = str(record.get("id", ""))
    if "messages" in record:
        prompt = record["messages"]
    elif "prompt" in record:
        prompt = record["prompt"]
    else:
        raise ValueError(f"record {sid!r}: needs 'prompt' or 'messages'")
    images = load_images(record.get("images") or [], base_dir)
    return encode_sample(processor_or_tokenizer, prompt, record.get("answer", ""), images,
                         sample_id=sid, capability=str(record.get("capability", "")))
