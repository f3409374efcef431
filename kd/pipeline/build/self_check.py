"""Build-time self-check: a few samples, captured as the build captures them, against a plain forward.

Before the first shard, ``kd cache build`` computes a few samples of its first batch one at a
time, unpadded, through a plain transformers forward of the teacher, then captures the batch
exactly as the shards will (same engine, batching and padding), and compares log-probs at the
captured ids, hidden states and attention maps. An architecture whose inputs kd batches wrongly
(a silently dropped ``pixel_values``, per-token inputs that miss the answer, a head kd applies
differently from the model) then stops the build with an error naming the family, the sample,
the signal and the difference, instead of writing a wrong cache that verifies and trains.

The reference is the hf engine's own model when the build uses it (no second copy), else a
transformers copy of the teacher on the build's device and dtype, let go before vLLM starts (at
its first capture), so the copy needs only the memory the teacher itself needs; with vLLM already
running in the process (a second build of the teacher), ``--no-self-check`` skips the copy.
Tolerances follow the dtype: batched and unbatched float32 forwards agree to ~1e-6; bf16 / fp16
to a few hundredths of a nat.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kd.pipeline.common.encoding import EncodedSample
from kd.pipeline.build.signals import TeacherSignals

# Max |difference| allowed, per compute dtype: log-probs in nats; hidden states relative to the
# layer's max |value|; attention weights absolute.
TOLERANCE = {"float32": 1e-4, "float16": 0.15, "bfloat16": 0.3}
CHECKED_SAMPLES = 3


class SelfCheckError(ValueError):
    """The batched capture disagrees with a plain single-sample forward: the cache would be wrong."""


@dataclass(frozen=True)
class SelfCheckReport:
    """What the self-check compared and how long it took (reported by ``kd cache build``)."""

    samples: tuple[str, ...]
    max_diff: dict[str, float]
    tolerance: float
    seconds: float
    # The whole batch's capture, in batch order: the build's first shard writes it instead of
    # capturing the batch again (``shard.keep_captured``).
    captured: tuple[TeacherSignals, ...] = field(default=(), repr=False, compare=False)


def pick_samples(encoded: Sequence[EncodedSample], n: int = CHECKED_SAMPLES) -> list[int]:
    """Indices of up to ``n`` samples of a batch: the longest, the shortest and the most image tokens
    (where padding and image batching would go wrong first), then the first ones."""
    if not encoded:
        return []
    lengths = [len(s.input_ids) for s in encoded]
    images = [int(s.image_token_mask.sum()) for s in encoded]
    order = [int(np.argmax(lengths)), int(np.argmin(lengths)), int(np.argmax(images))] + list(range(len(encoded)))
    return list(dict.fromkeys(order))[:n]


def reference_model(engine: Any, model_dir: str, *, device: str, dtype: str, trust_remote_code: bool = False) -> Any:
    """The plain transformers model to check ``engine`` against: the hf engine's own (the check is about
    batching, not weights), else a copy of the teacher on ``device`` in ``dtype``."""
    model = getattr(engine, "model", None)
    if model is not None:
        return model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    return cls.from_pretrained(model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                               attn_implementation="sdpa").to(device).eval()


def reference_signals(model: Any, sample: EncodedSample, hidden_layers: Sequence[int],
                      attention_layers: Sequence[int]) -> dict[str, Any]:
    """One unpadded forward of ``sample``: full log-probs, hidden states and head-averaged maps at
    the answer-predicting positions."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    extra = {}
    for name, arr in sample.model_inputs.items():
        t = torch.from_numpy(np.asarray(arr))
        extra[name] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    ids = torch.from_numpy(sample.input_ids.astype(np.int64))[None].to(device)
    kwargs: dict[str, Any] = {"output_hidden_states": bool(hidden_layers), "use_cache": False}
    if attention_layers:
        kwargs["output_attentions"] = True
    pos = torch.from_numpy(sample.target_positions).to(device)
    with torch.inference_mode():  # logits at the answer rows only: [S, V] would be ~1 GB at 1.6k x 152k
        out = model(input_ids=ids, logits_to_keep=pos, **kwargs, **extra)
    ref = {"logprobs": torch.log_softmax(out.logits[0].float(), -1).cpu()}
    ref["hidden"] = {i: out.hidden_states[i][0, pos].float().cpu() for i in hidden_layers}
    ref["attention"] = {i: out.attentions[i][0].float().mean(0)[pos].cpu() for i in attention_layers}
    return ref


def compare(sig: TeacherSignals, ref: dict[str, Any], image_mask: np.ndarray) -> dict[str, float]:
    """Max differences per signal between a capture and its reference (see ``TOLERANCE``);
    ``image_mask`` marks the image-token positions (the keys of t2v maps)."""
    ids = torch.from_numpy(np.asarray(sig.ids, dtype=np.int64))
    valid = ids >= 0  # sampled captures pad with -1
    at_ids = ref["logprobs"].gather(1, ids.clamp(min=0))
    diffs = {"logprobs": float((at_ids - torch.from_numpy(sig.logprobs))[valid].abs().max())}
    for layer, h in ref["hidden"].items():
        scale = float(h.abs().max()) or 1.0
        diffs[f"hidden[{layer}]"] = float((torch.from_numpy(sig.hidden[layer]) - h).abs().max()) / scale
    for layer, a in ref["attention"].items():
        if layer in sig.attention_full:
            diffs[f"attention[{layer}]"] = float((torch.from_numpy(sig.attention_full[layer]) - a).abs().max())
        elif layer in sig.attention_t2v:
            keys = torch.from_numpy(np.flatnonzero(image_mask))
            diffs[f"attention[{layer}]"] = float((torch.from_numpy(sig.attention_t2v[layer]) - a[:, keys]).abs().max())
    return diffs


def reference_outputs(load_reference: Callable[[], Any], samples: Sequence[EncodedSample], spec: Any) -> list[dict]:
    """``reference_signals`` of each sample through the model ``load_reference()`` returns, which
    is let go (and a GPU's cache emptied) before this returns."""
    model = load_reference()
    if spec.attention_layers:  # only eager attention materialises the weights (the hf engine switches too)
        model.set_attn_implementation("eager")
    try:
        return [reference_signals(model, s, spec.hidden_layers, spec.attention_layers) for s in samples]
    finally:
        on_cuda = next(model.parameters()).device.type == "cuda"
        del model
        if on_cuda:
            gc.collect()
            torch.cuda.empty_cache()


def run_self_check(engine: Any, load_reference: Callable[[], Any], batch: Sequence[Any], spec: Any, *,
                   family: str, dtype: str) -> SelfCheckReport:
    """Capture ``batch`` (raw records or encoded samples) with ``engine`` as a shard would, compare a
    few samples with the model ``load_reference()`` returns; raise ``SelfCheckError`` above tolerance.

    The references come first and their model is let go before the capture: a vLLM engine starts,
    and takes most of the device's memory, at its first capture, so a transformers copy of a
    teacher and vLLM are never on one GPU together (unless the engine already runs: a second
    build of the same teacher in one process)."""
    t0 = time.perf_counter()
    encoded = engine.encode(batch)
    picked = pick_samples(encoded)
    refs = reference_outputs(load_reference, [encoded[i] for i in picked], spec)
    captured = engine.capture(encoded, spec)
    tol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    worst: dict[str, float] = {}
    checked = []
    for i, ref in zip(picked, refs):
        s, sig = encoded[i], captured[i]
        for name, diff in compare(sig, ref, s.image_token_mask).items():
            worst[name] = max(worst.get(name, 0.0), diff)
            if not diff <= tol:  # NaN fails too
                raise SelfCheckError(
                    f"self-check failed for {family}: sample {s.sample_id!r}, {name} differs by {diff:.3g} from a "
                    f"plain single-sample transformers forward (tolerance {tol:g} at {dtype}); the batched capture "
                    f"of this architecture is wrong and nothing was written. Please report it with the model's "
                    f"config.json; --no-self-check skips this check (the cache may then be wrong)")
        checked.append(s.sample_id)
    return SelfCheckReport(tuple(checked), worst, tol, time.perf_counter() - t0, tuple(captured))
