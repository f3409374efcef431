"""What every teacher engine shares: the capture request (``SignalSpec``), the engine protocol,
and the numerics both engines must do identically (tail mass, sparse sampling, seeds).

Keeping these in one place is what lets a test hold the vLLM engine against the transformers one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from kd.pipeline.encoding import EncodedSample, encode_record
from kd.pipeline.signals import TeacherSignals

# Below this tail mass, fp32 top-k log-probs cannot resolve it (k rounding errors of ~1e-7 each):
# report -inf ("the top-k covers everything") rather than a noisy tiny number.
TAIL_EPS = 1e-6


@dataclass(frozen=True)
class SignalSpec:
    """What to capture per answer token.

    ``logits``: "topk" (the ``top_k`` most likely ids, exact) or "sampled" (``sampled_draws`` ids drawn
    from the teacher distribution: distinct ids + counts, unbiased in expectation, after Sparse Logit
    Sampling / RS-KD). ``hidden_layers`` use transformers' ``hidden_states`` numbering (0 = embeddings,
    ``num_layers`` = final normed output); ``attention_layers`` are 0-based decoder layer indices.
    """

    logits: Literal["topk", "sampled"] = "topk"
    top_k: int = 64
    sampled_draws: int = 12
    hidden_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()
    attention_kind: Literal["t2v", "full", "both"] = "t2v"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.logits not in ("topk", "sampled"):
            raise ValueError(f"logits must be 'topk' or 'sampled', got {self.logits!r}")
        if self.top_k < 1 or self.sampled_draws < 1:
            raise ValueError("top_k and sampled_draws must be >= 1")
        if self.attention_kind not in ("t2v", "full", "both"):
            raise ValueError(f"attention_kind must be 't2v', 'full' or 'both', got {self.attention_kind!r}")
        object.__setattr__(self, "hidden_layers", tuple(sorted({int(i) for i in self.hidden_layers})))
        object.__setattr__(self, "attention_layers", tuple(sorted({int(i) for i in self.attention_layers})))

    @property
    def width(self) -> int:
        """Columns of ``ids``/``logprobs``: ``top_k``, or ``sampled_draws`` (the most distinct draws)."""
        return self.top_k if self.logits == "topk" else self.sampled_draws

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_layers"] = list(self.hidden_layers)
        d["attention_layers"] = list(self.attention_layers)
        return d


Batch = Sequence["EncodedSample | Mapping[str, Any]"]


@runtime_checkable
class TeacherEngine(Protocol):
    """A teacher that turns encoded samples (or raw records) into ``TeacherSignals``, one per sample, in order."""

    name: str

    def capture(self, batch: Batch, spec: SignalSpec) -> list[TeacherSignals]: ...

    def identity(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def ensure_encoded(processor: Any, batch: Batch, base_dir: str | Path | None = None) -> list[EncodedSample]:
    """Encode raw records (mappings; images relative to ``record["base_dir"]`` or ``base_dir``)."""
    out = []
    for item in batch:
        if isinstance(item, EncodedSample):
            out.append(item)
        else:
            out.append(encode_record(processor, item, item.get("base_dir", base_dir)))
    return out


def text_config(config: Any) -> Any:
    """The language model's config (the text config of a VLM, the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_text_layers(config: Any) -> int:
    """Decoder layers of the language model (the text config of a VLM)."""
    return int(text_config(config).num_hidden_layers)


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


def load_config_and_processor(model_dir: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The model's config and its processor (VLM) or tokenizer (LLM), as the engines load them; no weights."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    is_vlm = getattr(config, "vision_config", None) is not None
    proc_cls = AutoProcessor if is_vlm else AutoTokenizer
    return config, proc_cls.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def _image_size(path: str | Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        return im.size


def sequence_lengths(processor: Any, records: Sequence[Any]) -> list[tuple[int, int, int]]:
    """``(prompt tokens, image tokens, answer tokens)`` of each record's teacher-forced sequence.

    Records need ``images``, ``prompt_or_messages`` and ``answer`` (``dataset.Record``). Computed
    as ``encoding.encode_sample`` builds the sequence, but without decoding a single image: the
    tokens an image expands to are measured once per image size on a blank image of that size
    (processors such as Idefics3, LLaVA and Qwen2-VL expand by size alone), so checking 100k
    samples costs a tokenizer pass, not a processor pass.
    """
    from kd.pipeline.encoding import _image_token, _tokenizer_of, build_messages, end_of_turn_token

    tok = _tokenizer_of(processor)
    image_token = _image_token(processor)
    eot = end_of_turn_token(processor)
    texts = []
    for r in records:
        messages = build_messages(r.prompt_or_messages, len(r.images), image_token)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts.append(text[0] if isinstance(text, list) else text)
    prompts = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    answers = tok([r.answer + eot for r in records], add_special_tokens=False)["input_ids"] if texts else []
    placeholder = len(tok(image_token, add_special_tokens=False)["input_ids"]) if texts else 0
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
        out.append((len(p) - placeholder * len(r.images), sum(image_tokens(path) for path in r.images), len(a)))
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


def tail_logmass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(topk)))`` per row, in float64, as float32; ``-inf`` when under ``TAIL_EPS``.

    Computed as ``log(-expm1(logsumexp))``, which stays accurate when the top-k mass is close to 1.
    """
    lp = topk_logprobs.double()
    s = torch.logsumexp(lp, dim=-1).clamp(max=0.0)
    rest = -torch.expm1(s)
    out = torch.where(rest > TAIL_EPS, torch.log(rest.clamp(min=TAIL_EPS)), torch.full_like(rest, -math.inf))
    return out.float()


def sample_seed(spec_seed: int, sample: EncodedSample) -> int:
    """A per-sample seed from the spec seed and the input ids, so draws do not depend on batching."""
    h = hashlib.sha256(f"{spec_seed}:{sample.input_hash}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_sparse(logprobs: torch.Tensor, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``draws`` ids per row from ``softmax(logprobs)`` ([T, V]) with a seeded CPU generator.

    Returns ``(ids, logprobs, counts)``, each ``[T, draws]``: the distinct drawn ids sorted by
    descending log-prob, padded with id -1, log-prob -inf and count 0. ``counts / draws`` is an
    unbiased estimate of the teacher distribution.
    """
    lp = logprobs.detach().to("cpu", torch.float64)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    drawn = torch.multinomial(lp.exp(), draws, replacement=True, generator=gen)  # [T, draws]
    t = lp.shape[0]
    ids = np.full((t, draws), -1, dtype=np.int32)
    out_lp = np.full((t, draws), -np.inf, dtype=np.float32)
    counts = np.zeros((t, draws), dtype=np.uint16)
    for row in range(t):
        uniq, cnt = torch.unique(drawn[row], return_counts=True)
        row_lp = lp[row, uniq]
        order = torch.argsort(row_lp, descending=True, stable=True)
        n = len(uniq)
        ids[row, :n] = uniq[order].numpy()
        out_lp[row, :n] = row_lp[order].float().numpy()
        counts[row, :n] = cnt[order].numpy()
    return ids, out_lp, counts


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json")


# The files that define token ids alone (no template, no image processing): equal hashes, equal ids.
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
               "special_tokens_map.json")


def _files_sha256(model_dir: str | Path, names: Sequence[str]) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in names:
        if (d / name).exists():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    return h.hexdigest()


def tokenizer_sha256(model_dir: str | Path) -> str:
    """Hash of a model directory's tokenizer, chat template and processor files (a cache key input)."""
    return _files_sha256(model_dir, TOKENIZER_FILES)


def vocab_sha256(model_dir: str | Path) -> str:
    """Hash of the files that map text to token ids, so a student can tell "another tokenizer" apart
    from "another chat template or image processor" when its answer ids disagree with a cache."""
    return _files_sha256(model_dir, VOCAB_FILES)


def engine_identity(model_dir: str | Path, *, hash_weights_below: int = 1 << 30) -> dict[str, Any]:
    """What identifies a teacher for cache keys: config, tokenizer and weight hashes.

    Weights are content-hashed when their total size is under ``hash_weights_below`` bytes; larger
    checkpoints hash only the safetensors headers (names, dtypes, shapes) and sizes, and say so.
    """
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    config.pop("transformers_version", None)
    ident: dict[str, Any] = {
        "model_dir": str(d.resolve()),
        "architectures": config.get("architectures"),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
    }
    ident["tokenizer_sha256"] = tokenizer_sha256(d)
    ident["vocab_sha256"] = vocab_sha256(d)
    weights = sorted(d.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in weights)
    w = hashlib.sha256()
    for p in weights:
        if total < hash_weights_below:
            w.update(p.name.encode() + bytes.fromhex(_sha256_file(p)))
        else:
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                w.update(p.name.encode() + f.read(n) + str(p.stat().st_size).encode())
    ident["weights_sha256"] = w.hexdigest()
    ident["weights_hash_kind"] = "content" if total < hash_weights_below else "header"
    return ident


def load_engine(name: str, model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32",
                trust_remote_code: bool = False, **kwargs: Any) -> TeacherEngine:
    """Build an engine by name: ``"hf"`` (transformers) or ``"vllm"``; extra kwargs go to the engine."""
    if name == "hf":
        from kd.pipeline.engines.hf_engine import HFEngine

        return HFEngine(model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    if name == "vllm":
        from kd.pipeline.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    raise ValueError(f"unknown engine {name!r}: expected 'hf' or 'vllm'")
