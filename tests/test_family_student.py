"""Each VLM family as a student: a cache of the family's own teacher trains it through ``kd distill``.

When the student *is* the cache's teacher, the top-k KD term is ~0 on a padded batch of mixed
samples (any input the student's forward mishandles, e.g. per-token processor inputs that cover
the prompt only, or pixel values dropped from a batch, shows up as a large KL); gradients are
finite; two ``kd distill`` steps run; ``kd eval`` generates from the saved student.
"""

from __future__ import annotations

import math

import pytest
import torch
from family_archs import VLM_ARCHS

from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill import distill, load_config, open_teachers
from kd.pipeline.distill.config import LossConfig
from kd.pipeline.distill.data import DistillDataset, collate
from kd.pipeline.distill.objective import build_objective
from kd.pipeline.distill.student import load_student, student_forward
from kd.pipeline.distill.evaluate import evaluate
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_families import build_tiny


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tmp_path_factory.mktemp("family_student")


@pytest.fixture(scope="module")
def data(world):
    return synthesize(world / "data", 2, seed=0, splits=(0.5, 0.5, 0.0))


@pytest.fixture(scope="module", params=VLM_ARCHS)
def family(request, world, data):
    """A tiny model of the family and a top-k + hidden + t2v cache it wrote of the train records."""
    arch = request.param
    model_dir = build_tiny(arch, world / arch, seed=7)
    cache = build_cache(BuildRequest(teacher=str(model_dir), data=str(data["train"]), out=str(world / "caches"),
                                     engine="hf", top_k=16, value_coding="fp32", hidden_layers=(2,),
                                     hidden_coding="fp32", attention_layers=(1,), attention_kind="t2v",
                                     shard_size=4, role="any"))
    return arch, model_dir, cache.path


def test_kd_is_zero_when_the_student_is_the_teacher(family, data):
    arch, model_dir, cache = family
    student, processor = load_student(model_dir)
    sources = open_teachers({"any": cache}, student_tokenizer=processor)
    records = load_records(data["train"])
    dataset = DistillDataset(records, processor, sources)
    batch = collate(dataset.__getitems__(list(range(min(4, len(dataset))))))
    assert len(set(batch["lengths"].tolist())) > 1, "the batch should need padding"
    objective = build_objective(LossConfig(), sources, student)
    out = student_forward(student, batch, hidden_layers=objective.hidden_layers,
                          attention_layers=objective.attention_layers)
    terms = objective(out, batch)
    kd = float(terms.terms["kd/any"])
    assert kd < 1e-4, f"{arch}: KD {kd} between the teacher and itself"
    terms.total({name: 1.0 for name in terms.losses}).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_distill_two_steps_and_eval_generates(family, data, world):
    arch, model_dir, cache = family
    cfg = load_config(student=str(model_dir), data=str(data["train"]), out=str(world / f"run-{arch}"),
                      teachers={"any": cache}, quiet=True,
                      train={"lr": 1e-3, "warmup_steps": 0, "grad_accum": 1, "batch_size": 3, "max_steps": 2})
    result = distill(cfg)
    assert result.steps == 2
    scored = evaluate(result.model_dir, data["val"], max_new_tokens=4)
    assert scored["n"] == len(load_records(data["val"])) and math.isfinite(scored["overall"])
