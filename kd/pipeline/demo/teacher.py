"""The demo's data and teacher: synthetic scenes split between teacher and student (a fraction of
the student's answers corrupted), the baselines, and the tiny teacher trained by plain cross-entropy."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any


from kd.pipeline.demo.plans import CAPABILITIES, DemoPlan
from kd.pipeline.demo.synth import QUESTIONS, split_sizes, synthesize
from kd.pipeline.demo.tiny_models import TEACHER, build_preset
from kd.pipeline.demo.util import read_jsonl, sha, write_json, write_jsonl


def corrupt_answers(rows: Sequence[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """Copies of ``rows`` where ``round(fraction * n)`` answers (chosen by ``seed``) are replaced by another
    answer of the same question's closed set, uniformly; those rows carry ``label_noise: true`` and
    ``clean_answer`` (metadata: the student never reads it)."""
    rng = random.Random(seed)
    out = [dict(r) for r in rows]
    n_bad = round(fraction * len(out))
    for i in rng.sample(range(len(out)), n_bad):
        r = out[i]
        options = [a for a in QUESTIONS[r["question"]].answers if a != r["answer"]]
        r["clean_answer"], r["answer"], r["label_noise"] = r["answer"], rng.choice(options), True
    return out


def majority_baseline(train_rows: Sequence[dict[str, Any]], test_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy on ``test_rows`` of answering each question type with its most frequent training answer
    (what a model that ignores the image can reach)."""
    by_q: dict[str, Counter] = defaultdict(Counter)
    for r in train_rows:
        by_q[r["question"]][r["answer"]] += 1
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in test_rows:
        guess = by_q[r["question"]].most_common(1)[0][0] if by_q[r["question"]] else ""
        hits[r["capability"]].append(guess == r["answer"])
    acc = {c: sum(h) / len(h) for c, h in sorted(hits.items())}
    return {"accuracy": acc, "average": sum(acc.values()) / len(acc) if acc else 0.0}


# ----------------------------------------------------------------------------- stage 0: data


def prepare_data(work: Path, plan: DemoPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Synthesize (once) and write the teacher's and the student's training files."""
    t0 = time.perf_counter()
    data = work / "data" / plan.mode
    synth_json = data / "synth.json"
    fresh = True
    if synth_json.exists():
        meta = json.loads(synth_json.read_text())
        fresh = (meta.get("n_scenes") != plan.n_scenes or meta.get("seed") != plan.data_seed
                 or meta.get("scenes_per_split") != split_sizes(plan.n_scenes, plan.splits))
    if fresh or not (data / "test.jsonl").exists():
        log(f"synthesizing {plan.n_scenes} driving scenes -> {data}")
        synthesize(data, plan.n_scenes, seed=plan.data_seed, splits=plan.splits)
    train = read_jsonl(data / "train.jsonl")
    scenes = sorted({r["scene"] for r in train})
    if len(scenes) < plan.teacher_scenes + plan.student_scenes:
        raise ValueError(f"{len(scenes)} training scenes < teacher {plan.teacher_scenes} + student {plan.student_scenes}")
    t_scenes = set(scenes[: plan.teacher_scenes])
    s_scenes = set(scenes[plan.teacher_scenes: plan.teacher_scenes + plan.student_scenes])
    teacher_rows = [r for r in train if r["scene"] in t_scenes]
    student_rows = corrupt_answers([r for r in train if r["scene"] in s_scenes], plan.label_noise, plan.data_seed)
    paths = {"teacher_train": data / "teacher_train.jsonl", "student_train": data / "student_train.jsonl",
             "val": data / "val.jsonl", "test": data / "test.jsonl"}
    for key, rows in (("teacher_train", teacher_rows), ("student_train", student_rows)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not paths[key].exists() or paths[key].read_text(encoding="utf-8") != text:
            write_jsonl(paths[key], rows)  # rewritten only when it changes: the caches key on its bytes
    test_rows = read_jsonl(paths["test"])
    info = {
        "dir": str(data), "reused": not fresh, "seconds": round(time.perf_counter() - t0, 2),
        "paths": {k: str(v) for k, v in paths.items()},
        "records": {"teacher_train": len(teacher_rows), "student_train": len(student_rows),
                    "val": len(read_jsonl(paths["val"])), "test": len(test_rows)},
        "scenes": {"teacher_train": len(t_scenes), "student_train": len(s_scenes)},
        "noisy_student_records": sum(1 for r in student_rows if r.get("label_noise")),
        "majority_baseline": majority_baseline(student_rows, test_rows),
    }
    log(f"data {'reused' if info['reused'] else 'written'}: teacher {info['records']['teacher_train']} clean records, "
        f"student {info['records']['student_train']} records ({info['noisy_student_records']} corrupted), "
        f"test {info['records']['test']}")
    return info


# ----------------------------------------------------------------------------- stage 1: the teacher


TEACHER_MARK = "kd_demo_teacher.json"


def train_supervised(model_dir: str | Path, train_jsonl: str | Path, out_dir: str | Path, *, steps: int,
                     batch_size: int, lr: float, seed: int = 0, val_jsonl: str | Path | None = None,
                     eval_every: int = 0, val_samples: int = 100, log: Callable[[str], None] = print,
                     log_every: int = 10) -> dict[str, Any]:
    """Plain cross-entropy training of a VLM on the answer tokens (the teacher's SFT).

    The samples are encoded once (the student encoding of ``kd.pipeline.distill``, so the teacher
    learns exactly the format it is later cached and evaluated in); AdamW, 20 warmup steps then a
    cosine decay to 10 %, gradient clipping at 1. Saves the model to ``out_dir``; returns the curve.
    """
    import math

    import torch

    from kd.pipeline.common.dataset import load_records
    from kd.pipeline.distill.data import DistillDataset, collate
    from kd.pipeline.distill.student import load_student, student_forward
    from kd.pipeline.distill.train import make_adamw
    from kd.pipeline.distill.evaluate import evaluate_model
    from kd.pipeline.distill.losses import answer_ce_loss

    model, processor = load_student(model_dir)
    tok = getattr(processor, "tokenizer", processor)
    dataset = DistillDataset(load_records(train_jsonl), processor, {})
    items = [dataset[i] for i in range(len(dataset))]
    val = load_records(val_jsonl)[:val_samples] if val_jsonl and eval_every else None
    gen = torch.Generator().manual_seed(seed)
    opt = make_adamw([{"params": list(model.parameters())}], lr=lr)  # kd distill's optimizer
    warm = min(20, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    curve: list[dict[str, Any]] = []
    order: list[int] = []
    t0 = time.perf_counter()
    model.train()
    window: list[float] = []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(items), generator=gen).tolist()
        batch = collate([items[i] for i in order[:batch_size]], pad_id=tok.pad_token_id or 0)
        del order[:batch_size]
        out = student_forward(model, batch)
        loss = answer_ce_loss(out.logits, batch["targets"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            curve.append({"step": step, "split": "train", "loss": sum(window) / len(window),
                          "seconds": round(time.perf_counter() - t0, 2)})
            window = []
        if val is not None and (step % eval_every == 0 or step == steps):
            res = evaluate_model(model, processor, val, batch_size=50)
            curve.append({"step": step, "split": "val", "average": res["average"], "accuracy": res["accuracy"]})
            last = next((c["loss"] for c in reversed(curve) if c["split"] == "train"), float("nan"))
            log(f"  teacher step {step}/{steps}: loss {last:.3f}, val average {res['average']:.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval()
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return {"curve": curve, "seconds": round(time.perf_counter() - t0, 2), "samples": len(items)}


def prepare_teacher(work: Path, plan: DemoPlan, data: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Build and train the teacher once; a checkpoint with a matching recipe is reused as it is."""
    from kd.pipeline.common.dataset import dataset_fingerprint, load_records
    from kd.pipeline.distill.evaluate import evaluate

    paths = data["paths"]
    recipe = {"preset": asdict(TEACHER), "init_seed": plan.teacher_init_seed, "steps": plan.teacher_steps,
              "batch": plan.teacher_batch, "lr": plan.teacher_lr,
              "data": dataset_fingerprint(load_records(paths["teacher_train"])), "version": 1}
    fp = sha(recipe)
    final = work / "models" / f"teacher-{plan.mode}"
    mark = final / TEACHER_MARK
    test_fp = dataset_fingerprint(load_records(paths["test"]))
    t_start = time.perf_counter()
    if mark.exists():
        info = json.loads(mark.read_text())
        if info.get("fingerprint") == fp and (final / "config.json").exists():
            evaluated = info.get("eval_data") == test_fp
            if not evaluated:  # same teacher, another test split: score it again (that runs the teacher)
                t0 = time.perf_counter()
                info["eval_test"] = eval_scores(evaluate(final, paths["test"], batch_size=50))
                info["eval_untrained"] = _eval_untrained_teacher(work, plan, paths["test"])
                info["eval_data"] = test_fp
                write_json(mark, info)
                log(f"teacher checkpoint reused, re-evaluated on a new test split in {time.perf_counter() - t0:.0f}s")
            else:
                log(f"teacher reused (trained earlier in {info['train_seconds']:.0f}s; not run again) -> {final}")
            return {**info, "reused": evaluated, "reused_checkpoint": True, "path": str(final),
                    "seconds": 0.0 if evaluated else round(time.perf_counter() - t_start, 2)}
    t0 = time.perf_counter()
    init = work / "models" / f"teacher-{plan.mode}-init"
    if init.exists():
        shutil.rmtree(init)
    untrained = _eval_untrained_teacher(work, plan, paths["test"], keep=init)
    log(f"training the teacher ({TEACHER.num_layers} layers x {TEACHER.hidden_size}) on "
        f"{data['records']['teacher_train']} clean records, {plan.teacher_steps} steps of {plan.teacher_batch}")
    tmp = work / "models" / f"teacher-{plan.mode}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    trained = train_supervised(init, paths["teacher_train"], tmp, steps=plan.teacher_steps,
                               batch_size=plan.teacher_batch, lr=plan.teacher_lr, seed=plan.teacher_init_seed,
                               val_jsonl=paths["val"], eval_every=max(1, plan.teacher_steps // 4),
                               val_samples=plan.val_samples, log=log)
    result = evaluate(tmp, paths["test"], batch_size=50)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    shutil.rmtree(init, ignore_errors=True)
    info = {"fingerprint": fp, "recipe": recipe, "eval_data": test_fp, "train_seconds": trained["seconds"],
            "build_seconds": round(time.perf_counter() - t0, 2), "curve": trained["curve"],
            "eval_test": eval_scores(result), "eval_untrained": untrained}
    write_json(mark, info)
    log(f"teacher trained in {trained['seconds']:.0f}s: test average {result['average']:.3f} "
        f"(untrained {untrained['average']:.3f}) -> {final}")
    return {**info, "reused": False, "seconds": info["build_seconds"], "path": str(final)}


def _eval_untrained_teacher(work: Path, plan: DemoPlan, test: str, keep: Path | None = None) -> dict[str, Any]:
    """Scores of the teacher's random init (the "clearly better than untrained" reference)."""
    from kd.pipeline.distill.evaluate import evaluate

    init = keep or work / "models" / f"teacher-{plan.mode}-init-eval"
    if init.exists():
        shutil.rmtree(init)
    build_preset("vlm", "teacher", init, seed=plan.teacher_init_seed)
    try:
        return eval_scores(evaluate(init, test, batch_size=50))
    finally:
        if keep is None:
            shutil.rmtree(init, ignore_errors=True)


def eval_scores(res: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": {c: res["accuracy"].get(c, 0.0) for c in CAPABILITIES}, "average": res["average"],
            "overall": res["overall"], "n": res["n"], "counts": dict(res.get("counts", {}))}


# ----------------------------------------------------------------------------- stage 1: caches
