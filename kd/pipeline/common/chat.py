"""A record's chat turns rendered to text by the model's chat template, cut into the pieces that
teacher forcing tokenizes (``encoding`` turns them into ids; the context check and the student's
alignment proof count and tokenize the same pieces).

``render_pieces`` gives the prompt (everything before the first supervised turn) and, after it,
alternating supervised turns and the unsupervised text between them (see ``encoding``'s rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
_END_OF_TURN_CANDIDATES = ("<end_of_utterance>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


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


@dataclass(frozen=True)
class TextPieces:
    """A sample's text as teacher forcing cuts it: ``prompt`` (holds every image), then ``after``,
    whose even pieces are supervised turns (each ending with the end-of-turn token) and whose odd
    pieces are the unsupervised text between two turns."""

    prompt: str
    after: tuple[str, ...]

    @property
    def turns(self) -> tuple[str, ...]:
        return self.after[::2]


def _render(proc: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    text = proc.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=False)
    return text[0] if isinstance(text, list) else text


def is_conversation(prompt_or_messages: Any, answer: str | None) -> bool:
    """True for messages that end with an assistant turn and no separate answer: every turn is supervised."""
    return (answer is None and not isinstance(prompt_or_messages, str) and bool(prompt_or_messages)
            and prompt_or_messages[-1].get("role") == "assistant")


def render_pieces(proc: Any, prompt_or_messages: str | Sequence[Mapping[str, Any]], answer: str | None,
                  num_images: int, *, sample_id: str = "") -> TextPieces:
    """The sample's text pieces (module docstring); a bad sample raises ``ValueError`` naming it."""
    where = f"sample {sample_id!r}"
    eot = end_of_turn_token(proc)
    messages = build_messages(prompt_or_messages, num_images, _image_token(proc))
    if not is_conversation(messages, answer):
        if not answer or not answer.strip():
            raise ValueError(f"{where}: empty answer")
        return TextPieces(_render(proc, messages, True), (answer + eot,))
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    image_turns = [i for i, m in enumerate(messages[assistant[0]:], assistant[0]) if _has_image(m, _image_token(proc))]
    if image_turns:
        raise ValueError(f"{where}: messages[{image_turns[0]}] holds an image after the first assistant turn; images "
                         "must come before the first supervised turn (split the conversation there)")
    full = _render(proc, messages, False)
    after: list[str] = []
    end = 0
    for k, i in enumerate(assistant):
        content = str(messages[i].get("content") or "").strip()
        if not content:
            raise ValueError(f"{where}: assistant turn {k} (messages[{i}]) is empty")
        prefix = _render(proc, messages[:i], True)
        # The turn starts where the template's generation prompt for it ends; a template whose
        # history differs from its generation prompt (LLaVA-OneVision's "assistant \n") starts it at the text.
        start = len(prefix) if full.startswith(prefix) and len(prefix) >= end else full.find(content, end)
        text_at = full.find(content, start) if start >= 0 else -1
        if text_at < 0:
            raise ValueError(f"{where}: the chat template does not render assistant turn {k} (messages[{i}]) as its "
                             "text (it rewrites turns), so its turns cannot be supervised in one sequence; give each "
                             "turn as its own record with 'answer'")
        text_end = text_at + len(content)
        stop = full.find(eot, text_end)
        if k:
            after.append(full[end:start])
        else:
            prompt = full[:start]
        if stop >= 0 and not full[text_end:stop].strip():
            end = stop + len(eot)
            after.append(full[start:end])
        else:  # the template closes turns without it (LLaVA-1.5): added, as in the single-answer rule
            end = text_end
            after.append(full[start:end] + eot)
    return TextPieces(prompt, tuple(after))


def _has_image(message: Mapping[str, Any], image_token: str) -> bool:
    content = message.get("content")
    if isinstance(content, str):
        return image_token in content or IMAGE_PLACEHOLDER in content
    return any(isinstance(part, Mapping) and part.get("type") == "image" for part in content or ())
