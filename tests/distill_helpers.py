"""Real teacher caches for the distillation and evaluation tests: tiny models, hf engine, cache writer.

``build_test_cache`` runs the transformers teacher engine on a JSONL and writes a sealed cache with
``kd.cache_schema`` exactly as stage one does (plan, one writer per shard, seal).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.cache_schema import BuildPlan, CacheBuild, Location, SignalConfig, key_inputs
from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.common.dataset import dataset_fingerprint, load_records
from kd.pipeline.build.engines import SignalSpec, load_engine
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset


def build_test_cache(teacher_dir: str | Path, jsonl: str | Path, root: str | Path, spec: SignalSpec, *,
                     value_coding: str = "fp32", shard_size: int = 4, engine=None) -> str:
    """Capture ``spec`` from the teacher on every record of ``jsonl``; return the sealed cache's url."""
    own = engine is None
    engine = engine or load_engine("hf", teacher_dir)
    try:
        records = load_records(jsonl)
        captured = engine.capture([r.as_dict() for r in records], spec)
        ident = engine.identity()
    finally:
        if own:
            engine.close()
    kinds = {"t2v": ("t2v",), "full": ("full",), "both": ("t2v", "full")}[spec.attention_kind]
    signals = SignalConfig(logits=spec.logits, top_k=spec.width, value_coding=value_coding,
                           sampled_draws=spec.sampled_draws if spec.logits == "sampled" else 0,
                           hidden_layers=spec.hidden_layers, hidden_coding="fp32",
                           attention_layers=spec.attention_layers,
                           attention_kinds=kinds if spec.attention_layers else (), attention_coding="fp32")
    inputs = key_inputs(teacher={"name": Path(teacher_dir).name, "weights": ident["weights_sha256"]},
                        tokenizer_hash=ident["tokenizer_sha256"], template_hash=ident["tokenizer_sha256"],
                        dataset_fingerprint=dataset_fingerprint(records), signals=signals,
                        engine={"name": "hf", "dtype": ident["dtype"], "spec_seed": spec.seed})
    build = CacheBuild(Location.from_url(str(root)), inputs, teacher={"name": Path(teacher_dir).name, **ident},
                       signals=signals)
    plan = BuildPlan.from_ids([r.id for r in records], shard_size)
    build.start(plan)
    by_id = {s.sample_id: s for s in captured}
    caps = {r.id: r.capability for r in records}
    for shard, ids in enumerate(plan.shards):
        writer = build.shard_writer(shard)
        for sid in ids:
            writer.add(by_id[sid], caps[sid])
        writer.commit()
    build.seal("test")
    return build.location.url


@pytest.fixture(scope="session")
def kd_world(tmp_path_factory):
    """Tiny teacher (4 x 128) and student (2 x 64) VLMs sharing a tokenizer, a student with another
    tokenizer (tokenizer_seed 1), synthetic data (train 9 records, val 6) and three teacher caches written by
    the hf engine: perception (top-k 16 + hidden + t2v layer 0), reasoning (top-k 16 + full maps of
    layers 0..2), both written here with ``build_test_cache``, and planning (sampled 12 draws + t2v
    layer 2, written by ``kd.pipeline.build.recipe.build_cache``)."""
    root = tmp_path_factory.mktemp("kd_world")
    teacher = build_preset("vlm", "teacher", root / "teacher")
    student = build_preset("vlm", "student", root / "student")
    other = build_preset("vlm", "student", root / "student-tok1", seed=1, tokenizer_seed=1)
    paths = synthesize(root / "data", 5, seed=0, splits=(0.6, 0.4, 0.0))
    engine = load_engine("hf", teacher)
    specs = {
        "perception": SignalSpec(top_k=16, hidden_layers=(2, 4), attention_layers=(0,), attention_kind="t2v"),
        "reasoning": SignalSpec(top_k=16, attention_layers=(0, 1, 2), attention_kind="full"),
    }
    caches = {role: build_test_cache(teacher, paths["train"], root / "caches", spec, engine=engine)
              for role, spec in specs.items()}
    engine.close()
    # The planning cache goes through stage one's own recipe (its manifest records no model_dir).
    caches["planning"] = build_cache(BuildRequest(
        teacher=str(teacher), data=str(paths["train"]), out=str(root / "caches"), engine="hf", logits="sampled",
        sampled_draws=12, value_coding="fp32", attention_layers=(2,), attention_kind="t2v", role="planning",
        shard_size=16)).path
    return {"root": root, "teacher": teacher, "student": student, "student_tok1": other,
            "train": paths["train"], "val": paths["val"], "caches": caches}
