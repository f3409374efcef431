"""Text-only students and teachers (Llama, Qwen2) against an independent single-sample forward, and
as students of their own cache (KD ~0), as the VLM families are in test_family_conformance / student."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_archs import TEXT_ARCHS
from fixtures_models import assert_same_topk

from kd.pipeline.build import BuildRequest, build_cache, close_warm_engines
from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill import open_teachers
from kd.pipeline.distill.config import LossConfig
from kd.pipeline.distill.data import DistillDataset, collate
from kd.pipeline.distill.objective import build_objective
from kd.pipeline.distill.student import load_student, student_forward
from kd.pipeline.common.encoding import encode_sample, end_of_turn_token
from kd.pipeline.build.engines import SignalSpec, load_engine
from kd.pipeline.demo.tiny_families import build_tiny

TOL = 1e-5
SAMPLES = [("short", "Is the road ahead clear?", "yes"),
           ("long", "How many cars and trucks are in the left lane near the intersection?", "two cars, one truck"),
           ("messages", [{"role": "system", "content": "You drive carefully."},
                         {"role": "user", "content": "What should the ego car do?"}], "brake and keep lane")]
SPEC = SignalSpec(top_k=16, hidden_layers=(0, 1, 2), attention_layers=(0, 1), attention_kind="full")


@pytest.fixture(scope="module", params=TEXT_ARCHS)
def text_family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model_dir = build_tiny(arch, root / "model", seed=4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    encoded = [encode_sample(tok, p, a, sample_id=sid) for sid, p, a in SAMPLES]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref = {}
    with torch.no_grad():
        for (sid, prompt, answer), enc in zip(SAMPLES, encoded):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            ids = tok(text + answer + end_of_turn_token(tok), add_special_tokens=False, return_tensors="pt")["input_ids"]
            assert np.array_equal(ids[0].numpy(), enc.input_ids), f"{arch}/{sid}: kd's ids differ from the tokenizer's"
            o = model(input_ids=ids, output_hidden_states=True, output_attentions=True, use_cache=False)
            pos = torch.from_numpy(enc.target_positions)
            ref[sid] = {"logprobs": torch.log_softmax(o.logits[0].double(), -1)[pos],
                        "hidden": {i: h[0, pos].numpy() for i, h in enumerate(o.hidden_states)},
                        "attn": {i: a[0].mean(0)[pos].numpy() for i, a in enumerate(o.attentions)}}
    return arch, root, model_dir, encoded, ref


def _check(arch, engine_name, encoded, captured, ref, spec):
    for s, sig in zip(encoded, captured):
        r = ref[s.sample_id]
        vals, ids = torch.topk(r["logprobs"], spec.top_k, dim=-1)
        np.testing.assert_allclose(sig.logprobs, vals.numpy(), atol=TOL, err_msg=f"{arch}/{engine_name}/{s.sample_id}")
        assert_same_topk(sig.ids, sig.logprobs, ids.numpy(), vals.numpy(), TOL)
        for layer in spec.hidden_layers:
            np.testing.assert_allclose(sig.hidden[layer], r["hidden"][layer], atol=TOL)
        for layer in spec.attention_layers:
            np.testing.assert_allclose(sig.attention_full[layer], r["attn"][layer], atol=TOL)


def test_hf_engine_matches_the_reference(text_family):
    arch, _, model_dir, encoded, ref = text_family
    _check(arch, "hf", encoded, load_engine("hf", model_dir).capture(encoded, SPEC), ref, SPEC)


@pytest.mark.vllm
def test_vllm_engine_matches_the_reference(text_family):
    pytest.importorskip("vllm")
    arch, _, model_dir, encoded, ref = text_family
    spec = SignalSpec(top_k=16, hidden_layers=(0, 1, 2))
    engine = load_engine("vllm", model_dir, dtype="float32", hidden_layers=spec.hidden_layers)
    try:
        _check(arch, "vllm", encoded, engine.capture(encoded, spec), ref, spec)
    finally:
        engine.close()


def test_kd_is_zero_when_the_text_student_is_its_teacher(text_family):
    arch, root, model_dir, _, _ = text_family
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"id": sid, "messages" if not isinstance(p, str) else "prompt": p,
                                        "answer": a, "capability": "planning"}) + "\n" for sid, p, a in SAMPLES))
    cache = build_cache(BuildRequest(teacher=str(model_dir), data=str(data), out=str(root / "caches"), engine="hf",
                                     top_k=16, value_coding="fp32", hidden_layers=(1,), hidden_coding="fp32",
                                     shard_size=4)).path
    close_warm_engines()
    student, tok = load_student(model_dir)
    sources = open_teachers({"any": cache}, student_tokenizer=tok)
    dataset = DistillDataset(load_records(data), tok, sources)
    batch = collate(dataset.__getitems__([0, 1, 2]))
    objective = build_objective(LossConfig(), sources, student)
    terms = objective(student_forward(student, batch, hidden_layers=objective.hidden_layers), batch)
    assert float(terms.terms["kd/any"]) < 1e-4
