"""bench/capture.py's timing tools: a row's result, timers patched around named functions, the
warm engines, and the pre-tokenized inputs of the ceiling rows (a) and (e)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kd.pipeline.build import shard as build_mod
from kd.pipeline.build import BuildRequest


class TokenRates:
    """Tokens/s of a timed run with ``prompt_tokens``, ``answer_tokens`` and ``seconds`` (capture's
    rows and gpu_check's rates report both the same way)."""

    prompt_tokens: int
    answer_tokens: int
    seconds: float

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.seconds

    @property
    def answer_tps(self) -> float:
        return self.answer_tokens / self.seconds


@dataclass
class Row(TokenRates):
    label: str
    seconds: float
    prompt_tokens: int
    answer_tokens: int
    note: str = ""


class Timers:
    """Wall time inside named functions during the timed builds (patched in, removed after)."""

    def __init__(self, targets: list[tuple[type, str, str]]):
        self.targets = targets
        self.total: dict[str, float] = {}
        self._undo: list[tuple[type, str, object]] = []

    def install(self) -> None:
        for owner, attr, name in self.targets:
            raw = owner.__dict__[attr]
            is_static = isinstance(raw, staticmethod)
            orig = raw.__func__ if is_static else raw
            totals = self.total

            def timed(*a, _orig=orig, _name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0

            setattr(owner, attr, staticmethod(timed) if is_static else timed)
            self._undo.append((owner, attr, raw))

    def reset(self) -> None:
        self.total.clear()

    def remove(self) -> None:
        for owner, attr, raw in reversed(self._undo):
            setattr(owner, attr, raw)
        self._undo.clear()


def drop_engines() -> None:
    """Close and forget every warm engine."""
    for eng in build_mod._WARM_ENGINES.values():
        eng.close()
    build_mod._WARM_ENGINES.clear()


def forced(request: BuildRequest, **changes) -> BuildRequest:
    return BuildRequest(**{**request.__dict__, "force": True, **changes})


def prefill_prompts(engine, records) -> list:
    """kd's own token prompts (one unexpanded placeholder per image, as kd sends them)."""
    from vllm.inputs import TokensPrompt

    prompts = []
    for s in engine.encode([r.as_dict() for r in records]):
        p = TokensPrompt(prompt_token_ids=list(s.vllm_prompt_ids))
        if s.images:
            p["multi_modal_data"] = {"image": list(s.images)}
        prompts.append(p)
    return prompts


def hf_batches(engine, records, batch_size: int) -> list[dict]:
    """The batches the hf engine forwards for these records (right-padded ids, mask, extra inputs)."""
    import numpy as np
    import torch

    from kd.pipeline.build.engines import hf_engine

    stack = getattr(hf_engine, "stack_model_inputs", None) or hf_engine._stack_model_inputs  # renamed upstream
    samples = engine.encode([r.as_dict() for r in records])
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        smax = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), smax), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), smax), dtype=torch.long)
        for b, s in enumerate(chunk):
            ids[b, : len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
            mask[b, : len(s.input_ids)] = 1
        extra = {k: torch.from_numpy(v) for k, v in (stack(chunk) or {}).items()}
        extra = {k: v.to(engine.dtype) if v.is_floating_point() else v for k, v in extra.items()}
        batches.append(dict(input_ids=ids, attention_mask=mask, **extra))
    return batches


def hf_forward(engine, batches: list[dict]) -> None:
    """A plain transformers forward of each batch: no hidden states, logits of the last position only."""
    import torch

    with torch.inference_mode():
        for b in batches:
            engine.model(**{k: v.to(engine.device) for k, v in b.items()}, use_cache=False, logits_to_keep=1)
    if str(engine.device).startswith("cuda"):
        torch.cuda.synchronize()  # the kernels are queued, not done: (d)'s builds end on a copy to the host

