"""Stage two with a text-only student: a plain causal LM (tiny Llama) distilled from a text teacher's
cache, and from a VLM teacher's cache on text-only records (same tokenizer); eval on text records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill import distill, load_config, open_teachers
from kd.pipeline.distill.data import DistillDataset, collate
from kd.pipeline.distill.objective import build_objective
from kd.pipeline.distill.student import load_student, student_forward
from kd.pipeline.common.encoding import encode_record
from kd.pipeline.distill.evaluate import evaluate
from kd.pipeline.distill.losses import (
    attention_map_loss,
    hidden_state_loss,
    padded_attention_map_loss,
)
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset

FAST = {"lr": 1e-3, "warmup_steps": 0, "grad_accum": 1, "batch_size": 3}


def _text_only(src: Path, dst: Path) -> Path:
    """The synthetic records without their images (the prompts still read as questions)."""
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    dst.write_text("".join(json.dumps({**r, "images": []}) + "\n" for r in rows))
    return dst


@pytest.fixture(scope="module")
def text_world(tmp_path_factory):
    """Text teacher (Llama 4 x 128) and student (Llama 2 x 64), a VLM teacher, all on one tokenizer;
    6 train / 3 val text-only records; a text teacher cache (top-k 16 + hidden 2, 4) and a VLM
    teacher cache of the same records (top-k 16 + hidden 4 + full attention maps of layers 0..2)."""
    root = tmp_path_factory.mktemp("text_world")
    paths = synthesize(root / "data", 3, seed=0, splits=(0.67, 0.33, 0.0))
    train = _text_only(paths["train"], root / "text_train.jsonl")
    val = _text_only(paths["val"], root / "text_val.jsonl")
    teacher = build_preset("llm", "teacher", root / "teacher")
    vlm_teacher = build_preset("vlm", "teacher", root / "vlm_teacher", seed=3)
    student = build_preset("llm", "student", root / "student", seed=5)
    common = {"data": str(train), "out": str(root / "caches"), "engine": "hf", "top_k": 16, "value_coding": "fp32",
                  "hidden_coding": "fp32", "shard_size": 4}
    text_cache = build_cache(BuildRequest(teacher=str(teacher), hidden_layers=(2, 4), **common)).path
    vlm_cache = build_cache(BuildRequest(teacher=str(vlm_teacher), hidden_layers=(4,), attention_layers=(0, 1, 2),
                                         attention_kind="full", role="reasoning", **common)).path
    return {"root": root, "train": train, "val": val, "image_train": paths["train"], "teacher": teacher,
            "vlm_teacher": vlm_teacher, "student": student, "text_cache": text_cache, "vlm_cache": vlm_cache}


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_text_student_distils_from_a_text_teacher_cache_and_evaluates(text_world):
    # One teacher serves every capability of the data (nothing to mix), whatever its role is called.
    cfg = load_config(student=str(text_world["student"]), data=str(text_world["train"]), out=str(text_world["root"] / "run"),
                      teachers={"text": text_world["text_cache"]}, val_data=str(text_world["val"]), quiet=True,
                      train={**FAST, "max_steps": 3})
    before = load_file(Path(text_world["student"]) / "model.safetensors")
    result = distill(cfg)
    assert result.steps == 3
    rows = _train_rows(result.run_dir)
    assert len(rows) == 3
    for row in rows:
        for term in ("ce", "kd/text", "hidden/text"):
            assert math.isfinite(row["terms"][term]), (term, row)
        assert row["terms"]["kd/text"] > 0 and row["terms"]["hidden/text"] > 0
        assert not any(k.startswith("attn") for k in row["terms"])  # the cache holds no maps
    assert json.loads((result.run_dir / "teachers.json").read_text())["text"]["key"]
    cfg_saved = json.loads((result.model_dir / "config.json").read_text())
    assert cfg_saved["architectures"] == ["LlamaForCausalLM"]  # still a plain causal LM
    after = load_file(result.model_dir / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student trained
    # eval: the run's final evaluation and `kd eval` on the saved model agree (greedy, deterministic).
    scored = evaluate(result.model_dir, text_world["val"])
    assert scored["n"] == 3 and set(scored["accuracy"]) == {"perception", "reasoning", "planning"}
    assert scored["accuracy"] == result.eval["accuracy"]


def test_kd_and_hidden_terms_fall_when_only_they_train(text_world):
    """Gradients of the top-k KL and the hidden-state MSE reach a text student and its projectors."""
    cfg = load_config(student="s", data="d", out="o", teachers={"text": text_world["text_cache"]},
                      loss={"ce": 0.0}).loss
    torch.manual_seed(0)
    student, tok = load_student(text_world["student"])
    sources = open_teachers({"text": text_world["text_cache"]}, {}, tok)
    dataset = DistillDataset(load_records(text_world["train"]), tok, sources)
    objective = build_objective(cfg, sources, student)
    assert objective.plans["text"].hidden_map == {1: 2, 2: 4}  # student depth 2, teacher depth 4
    batch = collate([dataset[i] for i in range(len(dataset))], pad_id=tok.pad_token_id)
    opt = torch.optim.Adam(list(student.parameters()) + list(objective.parameters()), lr=3e-3)
    history = []
    for _ in range(8):
        out = student_forward(student, batch, hidden_layers=objective.hidden_layers)
        bd = objective(out, batch)
        history.append((bd.terms["kd/text"], bd.terms["hidden/text"]))
        opt.zero_grad()
        bd.total(objective.fixed_weights()).backward()
        opt.step()
    (kd0, h0), (kd1, h1) = history[0], history[-1]
    assert kd1 < 0.7 * kd0 and h1 < 0.7 * h0, history


def test_vlm_teacher_cache_serves_a_text_student_on_text_records(text_world):
    """Same tokenizer and chat template: the VLM processor and the LLM tokenizer encode a text-only
    record to the same ids, so the VLM teacher's cache (logits, hidden, full maps) trains the LLM."""
    _, tok = load_student(text_world["student"])
    _, proc = load_student(text_world["vlm_teacher"])
    for rec in load_records(text_world["train"]):
        a, b = encode_record(tok, rec.as_dict()), encode_record(proc, rec.as_dict())
        assert np.array_equal(a.input_ids, b.input_ids) and a.answer_start == b.answer_start
    cfg = load_config(student=str(text_world["student"]), data=str(text_world["train"]),
                      out=str(text_world["root"] / "run_vlm"), teachers={"reasoning": text_world["vlm_cache"]},
                      quiet=True, train={**FAST, "max_steps": 2})
    result = distill(cfg)
    rows = _train_rows(result.run_dir)
    assert len(rows) == 2
    for row in rows:
        terms = row["terms"]
        for term in ("kd/reasoning", "hidden/reasoning", "attn/reasoning", "attn_full/reasoning/L0"):
            assert math.isfinite(terms[term]) and terms[term] > 0, (term, terms)


def test_text_student_on_image_records_names_the_sample(text_world):
    _, tok = load_student(text_world["student"])
    sources = open_teachers({"text": text_world["text_cache"]}, {}, tok)
    records = load_records(text_world["image_train"])  # same ids and answers, with images
    dataset = DistillDataset(records, tok, sources)
    with pytest.raises(ValueError, match=records[0].id):
        dataset[0]


# ----------------------------------------------------------------------------- batched loss pieces
# (the objective computes hidden and attention terms for the whole batch at once, text or VLM student)


def test_batched_hidden_and_attention_losses_equal_the_per_sample_ones():
    g = torch.Generator().manual_seed(0)
    s_h, t_h = torch.randn(7, 4, generator=g), torch.randn(7, 6, generator=g)
    proj = torch.nn.Linear(4, 6)
    for kind in ("mse", "cosine"):
        rows = hidden_state_loss(s_h, t_h, proj, kind, reduction="none")
        assert rows.shape == (7,)
        assert torch.allclose(rows.mean(), hidden_state_loss(s_h, t_h, proj, kind))
        assert torch.allclose(rows[2:5].mean(), hidden_state_loss(s_h[2:5], t_h[2:5], proj, kind))
    shapes = [(3, 5), (1, 2), (2, 0)]  # [T_b, K_b]; the last sample has no keys (a text-only sample's t2v)
    student, teacher = torch.rand(3, 3, 5, generator=g), torch.rand(3, 3, 5, generator=g)
    mask = torch.zeros(3, 3, 5, dtype=torch.bool)
    for b, (t, k) in enumerate(shapes):
        mask[b, :t, :k] = True
    per_sample = padded_attention_map_loss(student, teacher, mask)
    for b, (t, k) in enumerate(shapes):
        assert torch.allclose(per_sample[b], attention_map_loss(student[b, :t, :k], teacher[b, :t, :k]))


def test_map_attention_gives_the_eager_maps_and_gradients(text_world):
    """kd's sdpa+maps attention (weights of the answer rows of the hooked layers only) equals eager."""
    eager, tok = load_student(text_world["student"])
    eager.set_attn_implementation("eager")
    maps, _ = load_student(text_world["student"], attention=True)
    assert maps.config._attn_implementation == "kd_sdpa_maps"
    sources = open_teachers({"text": text_world["text_cache"]}, {}, tok)
    dataset = DistillDataset(load_records(text_world["train"]), tok, sources)
    batch = collate([dataset[i] for i in range(4)], pad_id=tok.pad_token_id)  # right-padded: a real mask
    a = student_forward(eager, batch, attention_layers=[0, 1])
    b = student_forward(maps, batch, attention_layers=[0, 1])
    for layer in (0, 1):
        assert torch.allclose(a.attention_padded[layer], b.attention_padded[layer], atol=1e-6)
        for x, y in zip(a.attention[layer], b.attention[layer]):
            assert torch.allclose(x, y, atol=1e-6) and torch.allclose(y.sum(-1), torch.ones(len(y)), atol=1e-5)
    for out in (a, b):
        out.attention_padded[0].pow(2).sum().backward()
    ga = eager.model.layers[0].self_attn.q_proj.weight.grad
    gb = maps.model.layers[0].self_attn.q_proj.weight.grad
    assert ga.abs().sum() > 0 and torch.allclose(ga, gb, atol=1e-5)
