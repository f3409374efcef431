"""The demo's students: one job per (variant, seed), run in worker processes, each a `kd distill` of
the same student init from the caches, then `kd eval`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from kd.pipeline.demo.plans import CAPABILITIES, ROLE_SIGNALS, DemoPlan
from kd.pipeline.demo.tiny_models import STUDENT, TEACHER, build_preset
from kd.pipeline.demo.teacher import eval_scores
from kd.pipeline.demo.util import torch_threads, write_json


def student_job(job: dict[str, Any]) -> dict[str, Any]:
    """One ``kd distill`` run and its ``kd eval`` on the test split (runs in a worker process)."""
    from kd.pipeline.distill import DistillConfig, distill
    from kd.pipeline.distill.evaluate import evaluate

    t0 = time.perf_counter()
    run_dir = Path(job["out"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with torch_threads(job.get("threads", 1)):
        config = DistillConfig(student=job["student"], data=job["data"], teachers=job["teachers"], out=str(run_dir),
                               val_data=job["val"], quiet=True, loss=job["loss"], train=job["train"])
        res = distill(config)
        train_s = time.perf_counter() - t0
        result = evaluate(res.model_dir, job["test"], batch_size=50)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimiser state: not needed by the report
    return {"variant": job["variant"], "seed": job["seed"], "run_dir": str(run_dir), "steps": res.steps,
            "train_seconds": round(train_s, 2), "seconds": round(time.perf_counter() - t0, 2),
            "eval_test": eval_scores(result)}


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
        write_json(Path(job["out"] + ".result.json"), result)


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
        write_json(jobs_file, jobs[w::workers])
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
