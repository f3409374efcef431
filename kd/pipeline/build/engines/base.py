"""What every teacher engine shares: the capture request (``SignalSpec``), the engine protocol,
and the numerics both engines must do identically (tail mass, sparse sampling, seeds).

Keeping these in one place is what lets a test hold the vLLM engine against the transformers one.
What an engine can serve (context, top-k, layers) is ``limits``; model files are ``common.model_files``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from kd.pipeline.build.signals import TeacherSignals
from kd.pipeline.common.encoding import EncodedSample, encode_record

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
