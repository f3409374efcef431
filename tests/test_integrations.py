"""kd's caches in other trainers: the transformers Trainer path (kd.integrations.transformers), TRL's
SFTTrainer where TRL is installed, and the README's examples of the torch API and the Trainer, run as
written. The reference everywhere is kd distill's own module (DistillModule = student_forward +
DistillObjective) on the same batch and weights."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from distill_helpers import kd_world  # noqa: F401
from safetensors.torch import load_file
from transformers import TrainingArguments

from kd.api import (
    AlignmentError,
    DistillDataset,
    DistillModule,
    LossConfig,
    build_objective,
    collate,
    load_records,
    load_student,
    open_teachers,
)
from kd.integrations.transformers import OBJECTIVE_FILE, KDDataset, KDTrainer, loss_config
from kd.pipeline.distill import distill, load_config

README = Path(__file__).resolve().parents[1] / "README.md"
ROLES = ("perception", "reasoning", "planning")
# Every weight away from its default, mixing included, so a field the Trainer path dropped shows.
LOSS = LossConfig(ce=0.7, kd=0.5, temperature=2.0, hidden=2.0, attention=1.5, mixing_diag=0.6)


def _args(out: Path, **kw) -> TrainingArguments:
    base = {"output_dir": str(out), "per_device_train_batch_size": 4, "report_to": [], "use_cpu": True,
            "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "seed": 0, "max_grad_norm": 0.0}
    return TrainingArguments(**{**base, **kw})


def _reference(world, student, processor, cfg: LossConfig) -> tuple[DistillModule, DistillDataset]:
    sources = open_teachers(world["caches"], {}, processor)
    dataset = DistillDataset(load_records(world["train"]), processor, sources)
    return DistillModule(student, build_objective(cfg, sources, student)), dataset


def _same_batch(dataset: DistillDataset, batch: dict, processor) -> dict:
    """The batch of those sample ids as kd distill's loader makes it (__getitems__ + collate)."""
    index = {rec.id: i for i, rec in enumerate(dataset.records)}
    tok = getattr(processor, "tokenizer", processor)
    return collate(dataset.__getitems__([index[s] for s in batch["sample_ids"]]), pad_id=tok.pad_token_id or 0)


def test_trainer_loss_and_gradients_equal_kd_distills_objective(kd_world, tmp_path):
    torch.manual_seed(0)
    student, processor = load_student(kd_world["student"])
    ref, dataset = _reference(kd_world, copy.deepcopy(student), processor, LOSS)
    train = KDDataset.from_caches(kd_world["train"], processor, kd_world["caches"])
    trainer = KDTrainer(model=student, args=_args(tmp_path), train_dataset=train, kd_loss=LOSS)
    trainer.kd_objective.load_state_dict(ref.objective.state_dict())  # the same projector weights
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["sample_ids"]) == 4 and set(batch["teachers"]) == set(ROLES)

    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first step
    loss = trainer.training_step(trainer.model, batch)  # the Trainer's step: prepare, compute_loss, backward
    ref.train()
    breakdown = ref(_same_batch(dataset, batch, processor))
    expected = breakdown.total(ref.objective.fixed_weights())
    expected.backward()
    for term in ("kd/perception", "hidden/perception", "attn/perception", "kd/reasoning", "attn/reasoning",
                 "kd/planning", "attn/planning"):  # every signal of the three caches is in the loss
        assert math.isfinite(breakdown.terms[term]) and breakdown.terms[term] > 0, term
    assert torch.allclose(loss, expected.detach(), rtol=1e-6, atol=0), (float(loss), float(expected))

    ours = dict(trainer.model.named_parameters())
    assert set(ours) == set(dict(ref.named_parameters()))  # student and projectors, nothing else
    projectors = [n for n in ours if n.startswith("objective.")]
    assert projectors and all(ours[n].grad is not None and ours[n].grad.abs().sum() > 0 for n in projectors)
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert ours[name].grad is None or not ours[name].grad.any(), name
        else:
            assert torch.allclose(ours[name].grad, p.grad, rtol=1e-5, atol=1e-7), name


def test_a_few_trainer_steps_lower_the_loss_train_the_projectors_and_save_the_student(kd_world, tmp_path):
    torch.manual_seed(0)
    student, processor = load_student(kd_world["student"])
    train = KDDataset.from_caches(kd_world["train"], processor, kd_world["caches"])
    trainer = KDTrainer(model=student, args=_args(tmp_path, per_device_train_batch_size=3, max_steps=8,
                                                  learning_rate=3e-3, lr_scheduler_type="constant"),
                        train_dataset=train, eval_dataset=train, kd_loss=LOSS)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.8 * before, (before, after)
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, start[n])}
    assert {n for n in start if n.startswith("objective.")} <= moved  # the optimizer saw the projectors
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 8 and all(math.isfinite(row["terms/kd/planning"]) for row in logged)

    out = tmp_path / "model"
    trainer.save_model(str(out))
    saved = load_file(out / "model.safetensors")
    assert not any(k.startswith(("student.", "objective.")) for k in saved)  # a plain transformers student
    reloaded, _ = load_student(out)
    for name, p in reloaded.state_dict().items():
        assert torch.equal(p, trainer.model.student.state_dict()[name]), name
    projectors = load_file(out / OBJECTIVE_FILE)
    assert projectors and all(torch.equal(v, trainer.kd_objective.state_dict()[k]) for k, v in projectors.items())


def test_resume_from_a_trainer_checkpoint_restores_student_and_projectors(kd_world, tmp_path):
    def make(max_steps: int) -> KDTrainer:
        torch.manual_seed(0)
        student, processor = load_student(kd_world["student"])
        train = KDDataset.from_caches(kd_world["train"], processor, kd_world["caches"])
        return KDTrainer(model=student, train_dataset=train, kd_loss=LOSS,
                         args=_args(tmp_path / "run", per_device_train_batch_size=3, max_steps=max_steps,
                                    learning_rate=3e-3, save_strategy="steps", save_steps=2))

    first = make(2)
    first.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / OBJECTIVE_FILE).is_file() and (ckpt / "config.json").is_file()
    second = make(3)
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.state.global_step == 3
    # What the resumed run started from is the checkpoint: compare with a fresh load of it.
    resumed = make(3)
    resumed._load_from_checkpoint(str(ckpt))
    for name, p in first.model.named_parameters():
        assert torch.equal(dict(resumed.model.named_parameters())[name], p), name


def test_alignment_is_checked_as_kd_distill_checks_it_with_the_same_error(kd_world, tmp_path):
    _, other = load_student(kd_world["student_tok1"])  # another tokenizer: answers do not line up
    with pytest.raises(AlignmentError) as ours:
        KDDataset.from_caches(kd_world["train"], other, kd_world["caches"])
    cfg = load_config(student=str(kd_world["student_tok1"]), data=str(kd_world["train"]), out=str(tmp_path / "d"),
                      teachers=kd_world["caches"], quiet=True)
    with pytest.raises(AlignmentError) as theirs:
        distill(cfg)
    assert str(ours.value) == str(theirs.value)
    assert re.match(r"sample '[^']+'", str(ours.value)) and kd_world["caches"]["perception"] in str(ours.value)


def test_what_the_trainer_path_cannot_do_is_refused_with_the_reason(kd_world, tmp_path):
    with pytest.raises(ValueError, match="learnable"):
        loss_config({"weighting": "learnable"})
    with pytest.raises(ValueError, match="AGP"):
        loss_config({"agp": True})
    with pytest.raises(ValueError, match="temperature"):
        loss_config({"temperature": 0})  # LossConfig's own checks still apply
    student, processor = load_student(kd_world["student"])
    with pytest.raises(TypeError, match="DistillDataset"):
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=[1, 2, 3])
    train = KDDataset.from_caches(kd_world["train"], processor, kd_world["caches"])
    with pytest.raises(ValueError, match="gradient checkpointing"):
        KDTrainer(model=student, args=_args(tmp_path, gradient_checkpointing=True), train_dataset=train)


def test_sft_trainer_path_matches_kd_distill_and_trains(kd_world, tmp_path):
    pytest.importorskip("trl")
    from trl import SFTConfig

    from kd.integrations.transformers import KDSFTTrainer

    torch.manual_seed(0)
    student, processor = load_student(kd_world["student"])
    ref, dataset = _reference(kd_world, copy.deepcopy(student), processor, LOSS)
    train = KDDataset.from_caches(kd_world["train"], processor, kd_world["caches"])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=4, learning_rate=3e-3,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                     gradient_checkpointing=False, lr_scheduler_type="constant")
    trainer = KDSFTTrainer(model=student, args=args, train_dataset=train, kd_loss=LOSS)
    trainer.kd_objective.load_state_dict(ref.objective.state_dict())
    batch = next(iter(trainer.get_train_dataloader()))
    ref.train()
    trainer.model.train()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        expected = ref(_same_batch(dataset, batch, processor)).total(ref.objective.fixed_weights())
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert "terms/attn/perception" in trainer.state.log_history[0]


# ----------------------------------------------------------------------------- README examples


def _readme_blocks() -> list[str]:
    """The python blocks of the README section 'Use a cache in your own trainer' (the first one
    names the paths; the others are the examples)."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Use a cache in your own trainer\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README lost its section 'Use a cache in your own trainer'"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def _paths(world, tmp_path: Path) -> dict:
    return {"student_dir": str(world["student"]), "data": str(world["train"]), "caches": dict(world["caches"]),
            "out_dir": str(tmp_path / "trainer")}


def test_readme_torch_loop_runs_as_written(kd_world, tmp_path):
    paths, loop, _ = _readme_blocks()
    assert "caches" in paths and "open_teachers" in loop and "DistillDataset" in loop
    torch.manual_seed(0)
    ns = _paths(kd_world, tmp_path)
    exec(compile(loop, "README.md:torch-loop", "exec"), ns)
    assert math.isfinite(float(ns["loss"].detach()))
    fresh, _ = load_student(kd_world["student"])
    trained = ns["student"].state_dict()
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.state_dict().items())  # the loop trained it


def test_readme_trainer_example_runs_as_written(kd_world, tmp_path):
    _, _, example = _readme_blocks()
    assert "KDTrainer" in example
    torch.manual_seed(0)
    ns = _paths(kd_world, tmp_path)
    exec(compile(example, "README.md:trainer", "exec"), ns)
    assert ns["trainer"].state.global_step > 0
    model_dir = tmp_path / "trainer" / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / OBJECTIVE_FILE).is_file()
    load_student(model_dir)  # what kd eval --model reads


# ----------------------------------------------------------------------------- several processes

_DDP_SCRIPT = '''
import json, sys, torch
from transformers import TrainingArguments
from kd.api import LossConfig, load_student
from kd.integrations.transformers import KDDataset, KDTrainer
student_dir, data, out, *caches = sys.argv[1:]
torch.manual_seed(0)
student, processor = load_student(student_dir)
train = KDDataset.from_caches(data, processor, dict(c.split("=", 1) for c in caches))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=3, learning_rate=3e-3, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
trainer = KDTrainer(model=student, args=args, train_dataset=train, kd_loss=LossConfig(temperature=2.0))
trainer.train()
flat = lambda m: torch.cat([p.detach().double().flatten() for p in m.parameters()])
report = {"world": trainer.args.world_size, "projectors": float(flat(trainer.model.objective).sum()),
          "student": float(flat(trainer.model.student).sum()),
          "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}
json.dump(report, open(f"{out}/rank{trainer.args.process_index}.json", "w"))
trainer.accelerator.end_training()  # as README says: destroys the process group, so each rank exits cleanly
'''


def test_kd_trainer_under_accelerate_launch_keeps_ranks_in_sync(kd_world, tmp_path):
    """Two CPU processes (gloo DDP through the Trainer's accelerate): DDP wraps student and projectors
    together, so after the steps both ranks hold the same student and the same projectors."""
    import os
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    caches = [f"{role}={url}" for role, url in kd_world["caches"].items()]
    run = subprocess.run([*launch, str(script), str(kd_world["student"]), str(kd_world["train"]),
                          str(tmp_path / "out"), *caches], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-6000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0] == ranks[1]  # same projectors, same student, same logged losses
    assert len(ranks[0]["losses"]) == 3 and all(math.isfinite(v) for v in ranks[0]["losses"])
