"""Drive-KD's pair: an InternVL teacher's cache distilled into a Qwen2.5-VL student.

The two tokenizers share Qwen2.5's base vocabulary but not their special tokens (InternVL adds
``<img>``, ``<IMG_CONTEXT>``, ...), and their prompts differ (image tokens, templates). The answers
align token for token, so kd must still refuse to read the teacher's ids as the student's without
a vocab map, and with one it maps every shared token by string and folds the rest into the tail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill import distill, load_config, open_teachers
from kd.pipeline.distill.data import AlignmentError, DistillDataset
from kd.pipeline.distill.student import load_student
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_families import build_tiny
from kd.pipeline.demo.tiny_models import TinyPreset


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("drive_kd_pair")
    teacher = build_tiny("internvl", root / "internvl-teacher", seed=2,
                         preset=TinyPreset(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256))
    student = build_tiny("qwen2_5_vl", root / "qwen2_5_vl-student", seed=5)
    data = synthesize(root / "data", 2, seed=0, splits=(1.0, 0.0, 0.0))["train"]
    cache = build_cache(BuildRequest(teacher=str(teacher), data=str(data), out=str(root / "caches"), engine="hf",
                                     top_k=32, value_coding="fp32", hidden_layers=(4,), hidden_coding="fp32",
                                     shard_size=4, role="perception")).path
    return root, teacher, student, data, cache


def test_without_a_vocab_map_the_student_is_refused_by_name(pair):
    _, _, student, data, cache = pair
    _, processor = load_student(student)
    with pytest.raises(AlignmentError, match=r"another vocabulary.*vocab_maps\.perception=auto"):
        DistillDataset(load_records(data), processor, open_teachers({"perception": cache}, student_tokenizer=processor))


def test_the_vocab_map_keeps_shared_tokens_and_folds_internvl_only_ones(pair):
    _, teacher, student, data, cache = pair
    _, processor = load_student(student)
    teacher_tok = load_student(teacher)[1].tokenizer
    sources = open_teachers({"perception": cache}, {"perception": "auto"}, processor)
    vmap = sources["perception"].vocab_map
    only_teacher = sorted(set(teacher_tok.get_vocab()) - set(processor.tokenizer.get_vocab()))
    assert "<IMG_CONTEXT>" in only_teacher
    assert (vmap.map_ids(np.asarray(teacher_tok.convert_tokens_to_ids(only_teacher))) == -1).all()
    shared = [t for t in processor.tokenizer.get_vocab() if t in teacher_tok.get_vocab()]
    assert np.array_equal(vmap.map_ids(np.asarray(teacher_tok.convert_tokens_to_ids(shared))),
                          np.asarray(processor.tokenizer.convert_tokens_to_ids(shared)))
    dataset = DistillDataset(load_records(data), processor, sources)  # the alignment proof, every sample
    for i in range(len(dataset)):
        sample = dataset[i]
        cached = sources["perception"].reader.get(sample.sample_id)
        assert np.array_equal(vmap.map_ids(cached.target_ids), sample.answer_ids)
        mapped = sample.teachers["perception"].ids
        keep = mapped >= 0
        assert (processor.tokenizer.convert_ids_to_tokens(mapped[keep].tolist())
                == teacher_tok.convert_ids_to_tokens(cached.ids[keep].tolist()))
        # Mass of unmapped entries moves into the tail: the distribution still sums to one.
        total = np.exp(sample.teachers["perception"].logprobs).sum(1, where=keep) + np.exp(sample.teachers["perception"].tail)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_the_qwen_student_trains_on_the_internvl_cache(pair):
    root, _, student, data, cache = pair
    cfg = load_config(student=str(student), data=str(data), out=str(root / "run"), teachers={"perception": cache},
                      vocab_maps={"perception": "auto"}, quiet=True,
                      train={"lr": 1e-3, "warmup_steps": 0, "grad_accum": 1, "batch_size": 3, "max_steps": 3})
    result = distill(cfg)
    assert result.steps == 3
    import json

    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["terms"]["kd/perception"])) and r["terms"]["kd/perception"] > 0
               for r in train)
    assert "hidden/perception" in train[0]["terms"]  # 128-wide teacher states through the projector
