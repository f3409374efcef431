"""Evaluation: greedy decoding on a tiny VLM and exact-match scoring per capability."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_models import tiny_vlm_dir  # noqa: F401

from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill.student import load_student
from kd.pipeline.common.encoding import encode_record
from kd.pipeline.distill.evaluate import evaluate, evaluate_model, greedy_answers, score
from kd.pipeline.demo.synth import synthesize

CAPS = {"perception", "reasoning", "planning"}


@pytest.fixture(scope="module")
def val_jsonl(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("eval-data"), 2, seed=3, splits=(0.0, 1.0, 0.0))["val"]


@pytest.fixture(scope="module")
def student(tiny_vlm_dir):
    return load_student(tiny_vlm_dir)


def test_evaluate_reports_accuracy_per_capability(tiny_vlm_dir, val_jsonl, tmp_path):
    preds = tmp_path / "preds.jsonl"
    result = evaluate(tiny_vlm_dir, val_jsonl, max_new_tokens=4, batch_size=4, predictions_out=preds)
    json.dumps(result)  # JSON-serialisable as is
    assert set(result["accuracy"]) == CAPS and result["counts"] == {c: 2 for c in CAPS} and result["n"] == 6
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    assert result["average"] == pytest.approx(sum(result["accuracy"].values()) / 3)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6 and {r["capability"] for r in rows} == CAPS


def test_batched_greedy_decoding_matches_one_by_one(student, val_jsonl):
    model, processor = student
    records = load_records(val_jsonl)
    assert greedy_answers(model, processor, records, max_new_tokens=5, batch_size=6) == \
        greedy_answers(model, processor, records, max_new_tokens=5, batch_size=1)


def test_a_model_that_emits_the_gold_answers_scores_one(student, val_jsonl):
    """Decoding plumbing (left padding, slicing at the prompt, stopping at end of turn) on known outputs."""
    model, processor = student
    records = load_records(val_jsonl)
    answers = [encode_record(processor, r.as_dict()).answer_ids.tolist() for r in records]  # answer + <eot>
    queue = list(answers)

    def fake_generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        rows = [queue.pop(0) for _ in range(input_ids.shape[0])]
        new = torch.full((len(rows), max_new_tokens), pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            row = row + [int(processor.tokenizer.convert_tokens_to_ids("yes"))]  # junk after the end of turn
            new[b, : min(len(row), max_new_tokens)] = torch.tensor(row[:max_new_tokens])
        return torch.cat([input_ids, new], dim=1)

    model.generate, original = fake_generate, model.generate
    try:
        result = evaluate_model(model, processor, records, max_new_tokens=6, batch_size=4)
    finally:
        model.generate = original
    assert result["overall"] == 1.0 and result["accuracy"] == {c: 1.0 for c in CAPS}


def test_score_is_exact_match_after_normalisation(val_jsonl):
    records = load_records(val_jsonl)[:3] + load_records(val_jsonl)[3:4]
    golds = [r.answer for r in records]
    preds = [golds[0].upper() + ".", "  " + golds[1] + "  ", "not an answer", golds[3] + "!"]
    result = score(records, preds)
    caps = [r.capability for r in records]
    assert caps[0] == caps[3] == "perception"
    assert result["accuracy"] == {"perception": 1.0, "reasoning": 1.0, "planning": 0.0}
    assert result["average"] == pytest.approx(2 / 3) and result["overall"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        score(records, preds[:2])
    assert np.isclose(score(records[:1], ["x"])["overall"], 0.0)
