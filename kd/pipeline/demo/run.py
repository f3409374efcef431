"""`kd demo`: the whole pipeline on a tiny built-in example, from nothing to a report, on CPU.

1. synthesize driving scenes (``kd data synth``) and split the training scenes in two disjoint
   parts: the teacher's (clean answers) and the student's (a fraction of answers corrupted);
2. build a tiny teacher VLM and TRAIN it (plain cross-entropy loop on its part);
3. ``kd cache build`` one cache per capability role (perception / reasoning / planning) from that
   one trained checkpoint, on the student's data, with the hf engine and role-specific signals;
4. ``kd distill`` a smaller student once with CE only (SFT) and with multi-teacher KD (and, in the
   full mode, one signal at a time: the ablation), same student init, data and steps, per seed;
5. ``kd eval`` every model on the held-out test split; write ``report.md``, ``report.json`` and a
   plot of the training curves (``kd.pipeline.demo.report``).

Running it again reuses the data, the trained teacher (checkpoint, curve and scores) and every
cache, so no teacher runs; only the students are trained again, from the caches. The report
says what was reused, with the timings of this run and of the original builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd.cache_schema import CacheReader, verify_cache

from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.demo import report as report_mod
from kd.pipeline.demo.plans import CAPABILITIES, PLANS, ROLE_SIGNALS, VARIANTS, DemoPlan  # noqa: F401
from kd.pipeline.demo.synth import QUESTIONS, split_sizes, synthesize
from kd.pipeline.demo.tiny_models import STUDENT, TEACHER, build_preset

@dataclass
class DemoResult:
    workdir: str
    mode: str = "quick"
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        files = {k: self.report.get("files", {}).get(k) for k in ("markdown", "json", "plot")}
        return {"workdir": self.workdir, "mode": self.mode, "caches": self.caches, "seconds": round(self.seconds, 2),
                "report": files, "results": self.report.get("summary", {})}


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No transformers progress bars (loading / writing shards) while the demo runs."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """One intra-op thread per process: on a busy 2-core machine two threads stall on each other."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


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
    train = _read_jsonl(data / "train.jsonl")
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
            _write_jsonl(paths[key], rows)  # rewritten only when it changes: the caches key on its bytes
    test_rows = _read_jsonl(paths["test"])
    info = {
        "dir": str(data), "reused": not fresh, "seconds": round(time.perf_counter() - t0, 2),
        "paths": {k: str(v) for k, v in paths.items()},
        "records": {"teacher_train": len(teacher_rows), "student_train": len(student_rows),
                    "val": len(_read_jsonl(paths["val"])), "test": len(test_rows)},
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
    fp = _sha(recipe)
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
                info["eval_test"] = _scores(evaluate(final, paths["test"], batch_size=50))
                info["eval_untrained"] = _eval_untrained_teacher(work, plan, paths["test"])
                info["eval_data"] = test_fp
                _write_json(mark, info)
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
            "eval_test": _scores(result), "eval_untrained": untrained}
    _write_json(mark, info)
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
        return _scores(evaluate(init, test, batch_size=50))
    finally:
        if keep is None:
            shutil.rmtree(init, ignore_errors=True)


def _scores(res: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": {c: res["accuracy"].get(c, 0.0) for c in CAPABILITIES}, "average": res["average"],
            "overall": res["overall"], "n": res["n"], "counts": dict(res.get("counts", {}))}


# ----------------------------------------------------------------------------- stage 1: caches


def build_caches(work: Path, plan: DemoPlan, teacher_dir: str, data: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """``kd cache build`` for each role from the one trained teacher, on the student's data."""
    caches = {}
    for role, signals in ROLE_SIGNALS.items():
        request = BuildRequest(teacher=teacher_dir, data=data["paths"]["student_train"], out=str(work / "caches"),
                               engine="hf", top_k=plan.top_k, role=role, shard_size=128, batch_size=16,
                               teacher_name=f"demo-teacher-{plan.mode}", **signals)
        res = build_cache(request)
        report = verify_cache(res.path)
        summary = CacheReader(res.path).summary()
        state = "reused (no teacher ran)" if res.reused else f"built in {res.seconds:.1f}s"
        log(f"cache {role:<10} {state}: {res.samples} samples, {res.tokens} tokens, "
            f"{summary['bytes_per_token']} B/token, verify {'OK' if report.ok else 'FAILED'} -> {res.path}")
        if not report.ok:
            raise RuntimeError(f"demo cache failed verification: {report.problems}")
        caches[role] = {"path": res.path, "key": res.key, "reused": res.reused, "seconds": round(res.seconds, 2),
                        "samples": res.samples, "tokens": res.tokens, "bytes_per_token": summary["bytes_per_token"],
                        "signals": {k: list(v) if isinstance(v, tuple) else v for k, v in signals.items()}}
    return caches


# ----------------------------------------------------------------------------- stage 2: students


def student_job(job: dict[str, Any]) -> dict[str, Any]:
    """One ``kd distill`` run and its ``kd eval`` on the test split (runs in a worker process)."""
    from kd.pipeline.distill import DistillConfig, distill
    from kd.pipeline.distill.evaluate import evaluate

    t0 = time.perf_counter()
    run_dir = Path(job["out"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with _torch_threads(job.get("threads", 1)):
        config = DistillConfig(student=job["student"], data=job["data"], teachers=job["teachers"], out=str(run_dir),
                               val_data=job["val"], quiet=True, loss=job["loss"], train=job["train"])
        res = distill(config)
        train_s = time.perf_counter() - t0
        result = evaluate(res.model_dir, job["test"], batch_size=50)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimiser state: not needed by the report
    return {"variant": job["variant"], "seed": job["seed"], "run_dir": str(run_dir), "steps": res.steps,
            "train_seconds": round(train_s, 2), "seconds": round(time.perf_counter() - t0, 2),
            "eval_test": _scores(result)}


def hidden_layer_map() -> dict[str, dict[int, int]]:
    """Each cached teacher hidden layer -> the student layer at the same relative depth.

    Stage one's manifest does not record the teacher's depth, so the objective's default would map
    teacher layer 2 (of 4) onto the student's *last* layer (2 of 2); this keeps depth proportional.
    """
    out = {}
    for role, s in ROLE_SIGNALS.items():
        layers = s.get("hidden_layers") or ()
        if layers:
            out[role] = {max(1, round(t * STUDENT.num_layers / TEACHER.num_layers)): t for t in layers}
    return out


def student_jobs(work: Path, plan: DemoPlan, data: dict[str, Any], caches: dict[str, dict[str, Any]]) -> list[dict]:
    teachers = {role: c["path"] for role, c in caches.items()}
    jobs = []
    for seed in plan.seeds:
        init = work / "models" / f"student-init-s{seed}"
        if not (init / "config.json").exists():  # same init for every variant of a seed
            tmp = init.with_name(init.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_preset("vlm", "student", tmp, seed=100 + seed)
            shutil.rmtree(init, ignore_errors=True)
            tmp.replace(init)
        for variant in plan.variants:
            loss = plan.variant_loss(variant)
            jobs.append({
                "variant": variant, "seed": seed, "student": str(init), "data": data["paths"]["student_train"],
                "val": data["paths"]["val"], "test": data["paths"]["test"], "teachers": teachers,
                "out": str(work / "runs" / plan.mode / f"{variant}-s{seed}"),
                "loss": {**loss, "mixing_diag": 0.8, "hidden_layer_map": hidden_layer_map()},
                "train": {"lr": plan.student_lr, "batch_size": plan.student_batch, "grad_accum": 1,
                          "max_steps": plan.student_steps, "warmup_steps": min(20, plan.student_steps // 10),
                          "min_lr_ratio": 0.1, "seed": seed, "mixed_precision": "no", "log_every": 5,
                          "eval_every": plan.eval_every, "eval_batch_size": 50, "eval_max_samples": plan.val_samples,
                          "keep_checkpoints": 1},
            })
    # Longest first (all signals, then single signals), so two workers finish together.
    cost = {"kd": 0, "attention": 1, "hidden": 2, "logits": 3, "sft": 4}
    return sorted(jobs, key=lambda j: (cost.get(j["variant"], 5), j["seed"]))


def _report_job(r: dict[str, Any], log: Callable[[str], None]) -> None:
    e = r["eval_test"]
    caps = ", ".join(f"{c[:4]} {e['accuracy'][c]:.2f}" for c in CAPABILITIES)
    log(f"  {r['variant']:<9} seed {r['seed']}: test average {e['average']:.3f} ({caps}) in {r['seconds']:.0f}s")


def worker_main(jobs_file: str) -> None:
    """Entry point of one worker process: run the jobs listed in ``jobs_file``, writing ``<out>.result.json`` each."""
    import torch

    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    for job in json.loads(Path(jobs_file).read_text()):
        result = student_job(job)
        _write_json(Path(job["out"] + ".result.json"), result)


def run_students(jobs: list[dict[str, Any]], workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the jobs in ``workers`` separate Python processes (one torch thread each), or here if 1.

    Workers are plain subprocesses (``python -c``), not multiprocessing, so the caller's ``__main__``
    is never re-imported. Jobs are dealt round-robin (the list is sorted longest first).
    """
    import subprocess
    import sys

    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(student_job(job))
            _report_job(results[-1], log)
        return results
    workers = min(workers, len(jobs))
    runs_root = Path(jobs[0]["out"]).parent
    runs_root.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        Path(job["out"] + ".result.json").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = []
    stack = contextlib.ExitStack()
    for w in range(workers):
        jobs_file = runs_root / f"worker-{w}.jobs.json"
        _write_json(jobs_file, jobs[w::workers])
        log_file = stack.enter_context(open(runs_root / f"worker-{w}.log", "w", encoding="utf-8"))  # noqa: SIM115
        cmd = [sys.executable, "-c", "import sys; from kd.pipeline.demo import worker_main; worker_main(sys.argv[1])",
               str(jobs_file)]
        procs.append((subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env), log_file,
                      runs_root / f"worker-{w}.log"))
    results: dict[str, dict[str, Any]] = {}
    try:
        while True:
            for job in jobs:
                path = Path(job["out"] + ".result.json")
                if job["out"] not in results and path.exists():
                    results[job["out"]] = json.loads(path.read_text())
                    _report_job(results[job["out"]], log)
            if len(results) == len(jobs):
                break
            for p, _, log_path in procs:
                if p.poll() not in (None, 0):
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"student worker failed (exit {p.returncode}); end of {log_path}:\n{tail}")
            if all(p.poll() == 0 for p, _, _ in procs) and len(results) < len(jobs):
                time.sleep(0.5)  # a result written just before exit
                if not all(Path(j["out"] + ".result.json").exists() for j in jobs):
                    raise RuntimeError("student workers exited without writing every result")
            time.sleep(0.5)
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stack.close()
    return [results[j["out"]] for j in jobs]


# ----------------------------------------------------------------------------- the demo


def demo_workers() -> int:
    """Parallel student runs: one per CPU core, at most 2 (``KD_DEMO_WORKERS`` overrides)."""
    env = os.environ.get("KD_DEMO_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


def run_demo(workdir: str | Path, *, quick: bool = True, log: Callable[[str], None] = print,
             plan: DemoPlan | None = None, workers: int | None = None) -> DemoResult:
    """Run the demo in ``workdir`` (``quick``: the small mode; ``plan`` overrides the mode's settings)."""

    t0 = time.perf_counter()
    plan = plan or PLANS["quick" if quick else "full"]
    workers = workers or demo_workers()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {}
    with _torch_threads(1), _quiet_progress():
        data = prepare_data(work, plan, log)
        timings["data"] = data["seconds"]
        teacher = prepare_teacher(work, plan, data, log)
        timings["teacher"] = teacher["seconds"]
        t1 = time.perf_counter()
        caches = build_caches(work, plan, teacher["path"], data, log)
        timings["caches"] = round(time.perf_counter() - t1, 2)
        jobs = student_jobs(work, plan, data, caches)
    log(f"training {len(jobs)} students ({len(plan.seeds)} seed(s) x {len(plan.variants)} variants, "
        f"{plan.student_steps} steps each) from the caches in {workers} process(es)")
    t2 = time.perf_counter()
    students = run_students(jobs, workers, log)
    timings["students"] = round(time.perf_counter() - t2, 2)
    result = DemoResult(str(work), mode=plan.mode)
    result.caches = caches
    timings["total_before_report"] = round(time.perf_counter() - t0, 2)
    doc = report_mod.build_report(work, plan=plan, data=data, teacher=teacher, caches=caches, students=students,
                                  timings=timings, workers=workers)
    result.seconds = time.perf_counter() - t0
    doc["timings"]["total"] = round(result.seconds, 2)
    report_mod.write_report(work, doc)
    result.report = doc
    log(report_mod.format_table(doc))
    log(f"report: {work / 'report.md'}, {work / 'report.json'}, {work / doc['files']['plot']}")
    (work / "demo.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result
