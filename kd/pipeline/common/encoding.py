"""One dataset record -> teacher-forced model inputs, the same for every teacher engine and the student.

Rule (one answer): full ids = tokens(chat-templated prompt up to the start of the assistant turn)
+ tokens(answer + end-of-turn). The answer is tokenized on its own, so its ids never depend on
the prompt, and teacher and student (sharing a tokenizer) see the same answer tokens.

Rule (a conversation whose ``messages`` end with an assistant turn, no ``answer``): every
assistant turn is supervised, in one sequence. The chat template renders the whole
conversation once; each assistant turn is its text as rendered there, from where the template's
generation prompt for that turn ends up to and including the end-of-turn token. The pieces
(prompt, turn 0, the text between turn 0 and turn 1, turn 1, ...) are tokenized each on its own
and concatenated; ``turn_starts`` / ``turn_lengths`` say where the turns lie. Images must sit in
the turns before the first assistant turn. Two template quirks are met as follows (``chat``):
history whose assistant header differs from the generation prompt (LLaVA-OneVision) starts the
turn at its text; turns closed without the end-of-turn token (LLaVA-1.5) get it appended, as the
single-answer rule does.

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

from kd.cache_schema.turns import single_turn, target_positions
from kd.cache_schema.writer import hash_ids  # one definition: the cache's alignment proof
from kd.pipeline.common.chat import (IMAGE_PLACEHOLDER, _image_token, _tokenizer_of, build_messages,  # noqa: F401
                                     end_of_turn_token, render_pieces)
from kd.pipeline.common.model_inputs import extend_per_token



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
        turn_starts / turn_lengths: ``[n]`` int64, where each supervised turn lies in ``input_ids``
            (one turn at ``answer_start`` for a single answer); ``answer_ids`` is their tokens in order.
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
    turn_starts: np.ndarray | None = None
    turn_lengths: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.turn_starts is None:
            self.turn_starts, self.turn_lengths = single_turn(self.answer_start, len(self.answer_ids))

    @property
    def num_answer_tokens(self) -> int:
        return int(self.answer_ids.shape[0])

    @property
    def target_positions(self) -> np.ndarray:
        """Positions whose outputs predict the answer tokens (``start - 1 + j`` in each turn)."""
        return target_positions(self.turn_starts, self.turn_lengths)

    @property
    def input_hash(self) -> str:
        return hash_ids(self.input_ids)

    @property
    def answer_hash(self) -> str:
        return hash_ids(self.answer_ids)




def encode_sample(
    processor_or_tokenizer: Any,
    prompt_or_messages: str | Sequence[Mapping[str, Any]],
    answer: str | None,
    images: Sequence[Any] = (),
    *,
    sample_id: str = "",
    capability: str = "",
) -> EncodedSample:
    """Encode one sample for teacher forcing (see the module docstring for the rules).

    ``answer=None`` with ``messages`` that end with an assistant turn supervises every assistant turn.
    """
    proc = processor_or_tokenizer
    tok = _tokenizer_of(proc)
    images = list(images)
    pieces = render_pieces(proc, prompt_or_messages, answer, len(images), sample_id=sample_id)
    # vLLM expands images itself: it takes the template's tokens with one placeholder per image.
    unexpanded = list(tok(pieces.prompt, add_special_tokens=False)["input_ids"])
    model_inputs: dict[str, np.ndarray] = {}
    if images:
        if tok is proc:
            raise ValueError(f"sample {sample_id!r}: images given but only a tokenizer (no processor)")
        enc = proc(text=[pieces.prompt], images=[images], return_tensors="np", add_special_tokens=False)
        prompt_ids = [int(i) for i in enc["input_ids"][0]]
        model_inputs = {k: np.asarray(v) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    else:
        prompt_ids = unexpanded
    after = [list(ids) for ids in tok(list(pieces.after), add_special_tokens=False)["input_ids"]]
    after_ids = [i for ids in after for i in ids]
    lengths = np.array([len(ids) for ids in after], np.int64)
    starts = len(prompt_ids) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    input_ids = np.asarray(prompt_ids + after_ids, dtype=np.int32)
    model_inputs = extend_per_token(model_inputs, len(input_ids))  # the tokens after the prompt are text
    image_id = tok.convert_tokens_to_ids(_image_token(proc)) if images else None
    mask = input_ids == image_id if image_id is not None else np.zeros(len(input_ids), dtype=bool)
    turn_ids = after[::2]
    return EncodedSample(
        sample_id=sample_id,
        input_ids=input_ids,
        answer_start=len(prompt_ids),
        answer_ids=np.asarray([i for ids in turn_ids for i in ids], dtype=np.int32),
        image_token_mask=mask,
        model_inputs=model_inputs,
        images=images,
        vllm_prompt_ids=unexpanded + after_ids,
        capability=capability,
        turn_starts=starts[::2].astype(np.int64),
        turn_lengths=lengths[::2],
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
    return encode_sample(processor_or_tokenizer, prompt, record.get("answer"), images,
                         sample_id=sid, capability=str(record.get("capability", "")))
