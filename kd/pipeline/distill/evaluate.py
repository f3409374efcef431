"""Greedy-decode answers and score them by exact match, per capability and on average.

The prompt is encoded exactly as for training (``encoding.encode_record``, cut at the start of
the last supervised turn: ``answer_start`` for one answer; for a conversation, everything before
its last assistant turn, which is the reference), so the model is asked in the format it was taught. Decoding stops at the
end-of-turn token. ``average`` is the mean of the per-capability accuracies (DriveBench's
"Avg"), ``overall`` the accuracy over all samples.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.pipeline.common.dataset import Record, load_records
from kd.pipeline.common.encoding import EncodedSample, encode_record, end_of_turn_token
from kd.pipeline.common.model_inputs import batch_model_inputs, truncate_per_token
from kd.pipeline.distill.scoring import exact_match, normalize_answer

__all__ = ["evaluate", "evaluate_model", "greedy_answers", "score"]


def _tok(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, processor: Any, records: Sequence[Record], *, max_new_tokens: int = 8,
                   batch_size: int = 8) -> list[str]:
    """Greedy answers (decoded text, special tokens dropped), one per record, in order."""
    tok = _tok(processor)
    eot = tok.convert_tokens_to_ids(end_of_turn_token(processor))
    stop = sorted({int(eot)} | ({int(tok.eos_token_id)} if tok.eos_token_id is not None else set()))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    encoded = [encode_record(processor, r.as_dict()) for r in records]
    out: list[str] = []
    try:
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            groups = [chunk] if _prompt_inputs(chunk) is not None else [[s] for s in chunk]
            for group in groups:
                out.extend(_generate(model, group, tok, stop, pad, device, dtype, max_new_tokens))
    finally:
        model.train(was_training)
    return out


def _prompt_inputs(samples: list[EncodedSample]) -> dict[str, np.ndarray] | None:
    """The prompts' extra processor inputs as one left-padded batch (None: they cannot share one)."""
    return batch_model_inputs([truncate_per_token(s.model_inputs, _prompt_end(s)) for s in samples],
                              [_prompt_end(s) for s in samples], padding_side="left")


def _prompt_end(s: EncodedSample) -> int:
    """Where generation starts: the last supervised turn (the one ``Record.final_answer`` holds)."""
    return int(s.turn_starts[-1])


def _generate(model, samples: list[EncodedSample], tok, stop: list[int], pad: int, device, dtype,
              max_new_tokens: int) -> list[str]:
    prompts = [s.input_ids[: _prompt_end(s)].astype(np.int64) for s in samples]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[b, width - len(p) :] = torch.from_numpy(p)
        mask[b, width - len(p) :] = 1
    extra = {}
    for name, arr in _prompt_inputs(samples).items():
        t = torch.from_numpy(arr)
        extra[name] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop, pad_token_id=pad, **extra)
    answers = []
    for row in gen[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stop), len(row))
        answers.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def score(records: Sequence[Record], predictions: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy per capability, their mean (``average``) and over all samples (``overall``)."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = defaultdict(list)
    for rec, pred in zip(records, predictions):
        hits[rec.capability].append(exact_match(pred, rec.final_answer))
    accuracy = {cap: sum(h) / len(h) for cap, h in sorted(hits.items())}
    n = sum(len(h) for h in hits.values())
    return {
        "n": n,
        "accuracy": accuracy,
        "counts": {cap: len(h) for cap, h in sorted(hits.items())},
        "average": sum(accuracy.values()) / len(accuracy) if accuracy else 0.0,
        "overall": sum(sum(h) for h in hits.values()) / n if n else 0.0,
    }


def evaluate_model(model: torch.nn.Module, processor: Any, records: Sequence[Record], *, max_new_tokens: int = 8,
                   batch_size: int = 8, max_samples: int | None = None,
                   predictions_out: str | Path | None = None) -> dict[str, Any]:
    """``score`` of ``greedy_answers`` on (the first ``max_samples`` of) ``records``."""
    records = list(records)[:max_samples] if max_samples else list(records)
    preds = greedy_answers(model, processor, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
    result = score(records, preds)
    result["max_new_tokens"] = max_new_tokens
    if predictions_out is not None:
        lines = [json.dumps({"id": r.id, "capability": r.capability, "answer": r.final_answer, "prediction": p,
                             "correct": normalize_answer(p) == normalize_answer(r.final_answer)}, ensure_ascii=False)
                 for r, p in zip(records, preds)]
        Path(predictions_out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return result


def evaluate(model_dir: str | Path, data_jsonl: str | Path, *, max_new_tokens: int = 8, batch_size: int = 8,
             max_samples: int | None = None, device: str = "auto",
             predictions_out: str | Path | None = None) -> dict[str, Any]:
    """Load a transformers model directory, greedy-decode ``data_jsonl`` and score it (JSON-serialisable)."""
    from kd.pipeline.distill.student import load_student

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_student(model_dir)
    model.to(device)
    result = evaluate_model(model, processor, load_records(data_jsonl), max_new_tokens=max_new_tokens,
                            batch_size=batch_size, max_samples=max_samples, predictions_out=predictions_out)
    result.update(model_dir=str(model_dir), data=str(data_jsonl))
    return result
