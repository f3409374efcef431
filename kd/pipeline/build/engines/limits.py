"""What one engine can serve for one model, known before any weight loads: context length, top-k
width, layer ids. Checked on the whole dataset before a cache directory exists, so a sample that
does not fit is an error naming it, not a failure hours into a build."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.pipeline.build.engines.base import SignalSpec
from kd.pipeline.common.model_files import text_config


@dataclass(frozen=True)
class EngineLimits:
    """What one engine can do with one model, known from the config alone (no weights loaded).

    ``max_positions``: tokens one teacher-forced sequence may hold (prompt + image tokens +
    answer); ``vocab_size``: the logits' width, the most ids a top-k can hold; ``max_logprobs``:
    the most log-probs per position the engine returns (vLLM's ``max_logprobs``; None = the vocab).
    ``where`` names the model (and engine setting) the numbers come from, for error messages.
    """

    engine: str
    max_positions: int | None
    vocab_size: int | None
    max_logprobs: int | None = None
    where: str = ""

    @property
    def max_sequence(self) -> int | None:
        """The longest teacher-forced sequence the engine accepts (None = unknown).

        vLLM must generate at least one token after the prompt (kd asks for ``max_tokens=1``) and
        refuses a prompt with ``len + 1 > max_model_len``, so it takes ``max_positions - 1``; a
        transformers forward takes all ``max_positions``.
        """
        if self.max_positions is None:
            return None
        return self.max_positions - self.reserved_positions

    @property
    def reserved_positions(self) -> int:
        """Positions the engine keeps for tokens it generates itself (vLLM: the one output token)."""
        return 1 if self.engine == "vllm" else 0

    @property
    def max_top_k(self) -> int | None:
        caps = [c for c in (self.vocab_size, self.max_logprobs) if c is not None]
        return min(caps) if caps else None


def engine_limits(engine: str, config: Any, options: Mapping[str, Any] | None = None, where: str = "") -> EngineLimits:
    """Context and top-k limits of ``engine`` on a model with this (transformers) config.

    vLLM's ``max_model_len`` and ``max_logprobs`` engine options lower the model's own limits
    (``max_logprobs=-1``, kd's default, means no cap beyond the vocabulary).
    """
    text = text_config(config)
    positions = getattr(text, "max_position_embeddings", None)
    vocab = getattr(text, "vocab_size", None)
    max_logprobs = None
    opts = dict(options or {})
    if engine == "vllm":
        if opts.get("max_model_len"):
            positions = min(int(opts["max_model_len"]), positions or int(opts["max_model_len"]))
            where = f"{where} with max_model_len={opts['max_model_len']}"
        if opts.get("max_logprobs") is not None and int(opts["max_logprobs"]) >= 0:
            max_logprobs = int(opts["max_logprobs"])
    return EngineLimits(engine, int(positions) if positions else None, int(vocab) if vocab else None,
                        max_logprobs, where)


def check_top_k(spec: SignalSpec, limits: EngineLimits) -> None:
    """Refuse a top-k (or vLLM's full-vocabulary request for sampling) the engine cannot return."""
    where = f" ({limits.where})" if limits.where else ""
    if spec.logits == "topk" and limits.max_top_k is not None and spec.top_k > limits.max_top_k:
        if limits.vocab_size is not None and spec.top_k > limits.vocab_size:
            why = f"the teacher's vocabulary has {limits.vocab_size} tokens"
        else:
            why = f"the {limits.engine} engine returns at most max_logprobs={limits.max_logprobs} log-probs per position"
        raise ValueError(f"--top-k {spec.top_k} is larger than the {limits.engine} engine allows: {why}{where}; "
                         f"use --top-k <= {limits.max_top_k}")
    if (spec.logits == "sampled" and limits.max_logprobs is not None and limits.vocab_size is not None
            and limits.max_logprobs < limits.vocab_size):
        raise ValueError(f"--logits sampled needs the full vocabulary ({limits.vocab_size}) per position but the "
                         f"{limits.engine} engine is capped at max_logprobs={limits.max_logprobs}{where}; "
                         "set max_logprobs=-1")


def _image_size(path: str | Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        return im.size


def sequence_lengths(processor: Any, records: Sequence[Any]) -> list[tuple[int, int, int]]:
    """``(prompt tokens, image tokens, answer tokens)`` of each record's teacher-forced sequence
    (a conversation's "answer": every token after the prompt, its turns and the text between them).

    Records need ``images``, ``prompt_or_messages`` and ``answer`` (``dataset.Record``). Computed
    as ``encoding.encode_sample`` builds the sequence, but without decoding a single image: the
    tokens an image expands to are measured once per image size on a blank image of that size
    (processors such as Idefics3, LLaVA and Qwen2-VL expand by size alone), so checking 100k
    samples costs a tokenizer pass, not a processor pass.
    """
    from kd.pipeline.common.chat import _image_token, _tokenizer_of, render_pieces

    tok = _tokenizer_of(processor)
    image_token = _image_token(processor)
    pieces = [render_pieces(processor, r.prompt_or_messages, r.answer, len(r.images), sample_id=r.id) for r in records]
    prompts = tok([p.prompt for p in pieces], add_special_tokens=False)["input_ids"] if pieces else []
    after = tok([a for p in pieces for a in p.after], add_special_tokens=False)["input_ids"] if pieces else []
    answers, at = [], 0
    for p in pieces:  # a record's pieces after its prompt are consecutive in ``after``
        answers.append(sum(len(ids) for ids in after[at : at + len(p.after)]))
        at += len(p.after)
    placeholder = len(tok(image_token, add_special_tokens=False)["input_ids"]) if pieces else 0
    per_size: dict[tuple[int, int], int] = {}

    def image_tokens(path: Any) -> int:
        size = _image_size(path)
        if size not in per_size:
            from PIL import Image

            enc = processor(text=[image_token], images=[[Image.new("RGB", size)]], add_special_tokens=False)
            per_size[size] = len(enc["input_ids"][0])  # what the placeholder in the prompt expands to
        return per_size[size]

    out = []
    for r, p, a in zip(records, prompts, answers):
        if r.images and tok is processor:
            raise ValueError(f"sample {r.id!r}: has images but the teacher has only a tokenizer (not a VLM)")
        out.append((len(p) - placeholder * len(r.images), sum(image_tokens(path) for path in r.images), a))
    return out


def check_context(records: Sequence[Any], processor: Any, limits: EngineLimits, source: str = "") -> None:
    """Refuse samples whose prompt + image tokens + answer exceed the teacher's context.

    Named by id (and ``source:line`` when records carry ``line``) with the lengths and the limit,
    before anything is written: a too-long sample would fail, or be silently truncated, hours into
    a build. The limit is ``limits.max_sequence``: vLLM takes one token less than the model's length
    (it must generate one), transformers all of it. ``limits.max_positions`` None (unknown) checks nothing.
    """
    if limits.max_sequence is None or not records:
        return
    too_long = []
    for r, (prompt, image, answer) in zip(records, sequence_lengths(processor, records)):
        total = prompt + image + answer
        if total > limits.max_sequence:
            line = getattr(r, "line", None)
            at = f" ({source}:{line})" if source and line is not None else ""
            too_long.append(f"{r.id!r}{at}: prompt {prompt} + image {image} + answer {answer} = {total} tokens")
    if too_long:
        more = f" (and {len(too_long) - 3} more)" if len(too_long) > 3 else ""
        where = f" ({limits.where})" if limits.where else ""
        reserved = (f"; the {limits.engine} engine generates {limits.reserved_positions} token after the sequence, "
                    f"so a sequence may hold at most {limits.max_sequence} tokens" if limits.reserved_positions else "")
        raise ValueError(f"{len(too_long)} sample(s) longer than the teacher's context of {limits.max_positions} "
                         f"tokens{where}: {'; '.join(too_long[:3])}{more}{reserved}")


def check_layers(spec: SignalSpec, num_layers: int) -> None:
    """Reject layer ids the model does not have, naming the valid range."""
    bad = [i for i in spec.hidden_layers if not 0 <= i <= num_layers]
    if bad:
        raise ValueError(f"hidden_layers {bad} out of range: valid 0..{num_layers} (0 = embeddings)")
    bad = [i for i in spec.attention_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"attention_layers {bad} out of range: valid 0..{num_layers - 1}")
